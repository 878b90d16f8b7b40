//! Builds the dashboard (`web-ui/`, TypeScript + Vite) with npm and embeds
//! every file it produces in the binary, so `cargo run` alone serves it.
//!
//! Needs Node.js and npm; without them the build stops and says what to
//! install. The dashboard's packages are installed with `npm ci`, which
//! never modifies the committed lockfile. `WIDGETRY_UI_DIST=DIR` embeds an
//! already built `dist/` instead (the Dockerfile builds it in a Node stage).
//! `WIDGETRY_SKIP_UI=1` builds without the dashboard (the server then
//! answers `/` with a page saying so) — for tooling that must not run npm.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let ui = manifest.join("../../web-ui");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    let dist = out.join("web-dist");
    println!("cargo:rerun-if-env-changed=WIDGETRY_SKIP_UI");
    println!("cargo:rerun-if-env-changed=WIDGETRY_UI_DIST");
    for f in [
        "src",
        "index.html",
        "package.json",
        "package-lock.json",
        "vite.config.ts",
        "tsconfig.json",
        "public",
    ] {
        // A path that does not exist would make every build stale.
        if ui.join(f).exists() {
            println!("cargo:rerun-if-changed={}", ui.join(f).display());
        }
    }

    let skip = std::env::var("WIDGETRY_SKIP_UI").is_ok_and(|v| v == "1");
    let files = if skip {
        println!("cargo:warning=WIDGETRY_SKIP_UI=1: building without the dashboard");
        vec![]
    } else if let Ok(prebuilt) = std::env::var("WIDGETRY_UI_DIST") {
        let prebuilt = PathBuf::from(prebuilt);
        println!("cargo:rerun-if-changed={}", prebuilt.display());
        assert!(
            prebuilt.join("index.html").is_file(),
            "WIDGETRY_UI_DIST={} has no index.html: build web-ui first (npm install && npm run build)",
            prebuilt.display()
        );
        let mut files = Vec::new();
        collect(&prebuilt, &prebuilt, &mut files);
        files
    } else {
        build_ui(&ui, &dist);
        let mut files = Vec::new();
        collect(&dist, &dist, &mut files);
        files
    };

    let mut code =
        String::from("/// (path under /, content type, bytes) of every dashboard file.\n");
    code.push_str("pub static ASSETS: &[(&str, &str, &[u8])] = &[\n");
    for (rel, abs) in &files {
        let _ = writeln!(
            code,
            "    ({rel:?}, {:?}, include_bytes!({:?})),",
            mime(rel),
            abs.display().to_string()
        );
    }
    if files.is_empty() {
        code.push_str(
            "    (\"index.html\", \"text/html; charset=utf-8\", b\"<!doctype html><title>Widgetry</title><p>This widgetry binary was built with WIDGETRY_SKIP_UI=1, without the dashboard. The API is under /api/v1/.</p>\"),\n",
        );
    }
    code.push_str("];\n");
    std::fs::write(out.join("assets.rs"), code).expect("write assets.rs");
}

fn build_ui(ui: &Path, dist: &Path) {
    let npm = if cfg!(windows) { "npm.cmd" } else { "npm" };
    let ok = Command::new(npm)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        panic!(
            "\n\nBuilding widgetry needs Node.js (20 or newer) and npm to build the dashboard in web-ui/, \
             and `npm --version` did not run.\nInstall them (Debian: `apt-get install nodejs npm`, or from nodejs.org), \
             or build without the dashboard with WIDGETRY_SKIP_UI=1.\n\n"
        );
    }
    let lock = ui.join("package-lock.json");
    let installed = ui.join("node_modules/.package-lock.json");
    let stale = match (mtime(&lock), mtime(&installed)) {
        (Some(l), Some(i)) => l > i,
        _ => true,
    };
    if stale {
        // `npm ci` installs exactly what the committed lockfile pins and
        // never rewrites it, so a build leaves the checkout unchanged. The
        // lockfile lists every platform's optional packages (rollup's and
        // esbuild's native builds); `npm ci` refuses a lockfile out of sync
        // with package.json: after changing package.json run `npm install`
        // in web-ui/ and commit the lockfile.
        progress("npm ci: installing the dashboard's packages from web-ui/package-lock.json");
        run(
            Command::new(npm)
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(ui),
            "npm ci",
        );
    }
    progress("npm run build: building the dashboard (tsc + vite) to embed it");
    run(
        Command::new(npm)
            .args(["run", "build", "--", "--outDir"])
            .arg(dist)
            .arg("--emptyOutDir")
            .current_dir(ui),
        "npm run build",
    );
}

/// Says what a long step is doing while it runs. Cargo shows a build
/// script's output only when it fails, so this writes to the terminal the
/// build runs in, when there is one (CI logs get scripts/test.sh's steps).
fn progress(what: &str) {
    use std::io::Write as _;
    if let Ok(mut tty) = std::fs::OpenOptions::new().write(true).open("/dev/tty") {
        let _ = writeln!(tty, "   widgetry-server build.rs: {what}");
    }
    eprintln!("{what}");
}

fn run(cmd: &mut Command, what: &str) {
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("\n\n`{what}` in web-ui/ failed ({s}); see its output above.\n\n"),
        Err(e) => panic!("\n\ncannot run `{what}` in web-ui/: {e}\n\n"),
    }
}

fn mtime(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        if p.is_dir() {
            collect(root, &p, out);
        } else if let Ok(rel) = p.strip_prefix(root) {
            let rel = rel.to_string_lossy().replace('\\', "/");
            out.push((rel, p));
        }
    }
}

fn mime(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" => "application/json",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}
