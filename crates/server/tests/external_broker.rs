//! Scale-out against a real external broker (Mosquitto, started here on a
//! free loopback port): two `widgetry ingest` processes share the load via
//! an MQTT shared subscription and write one database; one is SIGKILLed
//! mid-run and nothing is lost or stored twice.

mod common;

use std::time::Duration;

use common::*;
use widgetry_agent::AgentConfig;
use widgetry_proto::SeriesKey;
use widgetry_server::store::Store;

async fn stored(store: &Store, device: &str, series: &str) -> Vec<(i64, f64)> {
    store
        .series_points(device, &SeriesKey::plain(series), 0, i64::MAX)
        .await
        .expect("query")
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shared_ingestors_on_mosquitto_survive_losing_one() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let _broker = start_mosquitto(dir.path(), port).await;
    let db = test_database(dir.path()).await;
    // Both ingestors and this test open the new database at once: its
    // creation and migrations must be serialised (on SQLite by a lock file,
    // on PostgreSQL by sqlx's advisory lock).
    let mut first = start_ingest(port, &db, "ingest-a");
    let _second = start_ingest(port, &db, "ingest-b");
    let store = Store::open(&db).await.expect("open db");
    let spool = tempfile::tempdir().expect("spool");
    let mut cfg = AgentConfig::new("127.0.0.1", port, "mosq-dev");
    cfg.inputs = test_inputs();
    cfg.interval = Duration::from_millis(50);
    cfg.batch_max_wait = Duration::from_millis(100);
    cfg.ack_timeout = Duration::from_secs(1);
    cfg.spool_dir = spool.path().to_path_buf();
    let agent = Agent::with_config(cfg, spool);
    wait_for(
        "samples stored through mosquitto",
        Duration::from_secs(30),
        || async { (stored(&store, "mosq-dev", "mem.used_bytes").await.len() >= 20).then_some(()) },
    )
    .await;
    first.0.kill().expect("kill -9 one ingestor");
    first.0.wait().expect("reap");
    let before = stored(&store, "mosq-dev", "mem.used_bytes").await.len();
    wait_for(
        "the other ingestor keeps storing",
        Duration::from_secs(30),
        || async {
            (stored(&store, "mosq-dev", "mem.used_bytes").await.len() >= before + 40).then_some(())
        },
    )
    .await;
    let report = agent.stop().await;
    assert_eq!(report.batches_unacked, 0, "{report:?}");
    let mut total = 0u64;
    for series in SERIES {
        let pts = stored(&store, "mosq-dev", series).await;
        for w in pts.windows(2) {
            assert!(
                w[0].0 < w[1].0,
                "{series}: duplicate or unordered sample at {}",
                w[1].0
            );
        }
        total += pts.len() as u64;
    }
    assert_eq!(
        total, report.samples_taken,
        "every sample of the agent's series stored once: {report:?}"
    );
    store.close().await;
}
