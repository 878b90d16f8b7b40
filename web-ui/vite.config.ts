import { defineConfig } from "vite";

// Assets use relative paths so the dashboard works from the binary at `/`
// and behind a path prefix. `build.rs` passes --outDir into Cargo's OUT_DIR.
export default defineConfig({
  base: "./",
  build: {
    outDir: "dist",
    chunkSizeWarningLimit: 1200,
  },
  test: {
    include: ["src/**/*.test.ts"],
  },
} as never);
