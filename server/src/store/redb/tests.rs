//! Tests of what only the embedded store has.

use super::*;

fn set_version(path: &Path, v: u64) {
    let db = Database::create(path).unwrap();
    let t = db.begin_write().unwrap();
    t.open_table(META)
        .unwrap()
        .insert("schema_version", v)
        .unwrap();
    t.commit().unwrap();
}

fn version(path: &Path) -> Option<u64> {
    let db = Database::create(path).unwrap();
    let t = db.begin_read().unwrap();
    let meta = t.open_table(META).unwrap();
    let v = meta.get("schema_version").unwrap().map(|v| v.value());
    v
}

/// A DS restarted while the old one is still exiting waits for the
/// file rather than failing at once.
#[test]
fn opening_waits_for_a_store_being_released() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let first = RedbStore::open(&path).unwrap();
    let p2 = path.clone();
    let second = std::thread::spawn(move || RedbStore::open(&p2).map(|_| ()));
    std::thread::sleep(std::time::Duration::from_millis(300));
    first.close();
    drop(first);
    second.join().unwrap().unwrap();
}

#[test]
fn a_version_1_data_dir_is_upgraded_and_an_unknown_version_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    drop(RedbStore::open(&path).unwrap());
    assert_eq!(version(&path), Some(SCHEMA_VERSION));
    set_version(&path, 1);
    drop(RedbStore::open(&path).unwrap());
    assert_eq!(version(&path), Some(2));
    set_version(&path, 3);
    assert!(matches!(
        RedbStore::open(&path),
        Err(StoreError::Corrupt(_))
    ));
}
