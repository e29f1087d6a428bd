//! The local Ceph RADOS Gateway the object-store tests use
//! (`scripts/ceph-rgw.sh`): started here when Ceph is installed and it is
//! not running. Where Ceph is not installed the tests that need it say so
//! and pass, unless `BLOCKSNAP_REQUIRE_RGW` is set (CI sets it): then
//! they fail.

use std::path::Path;
use std::sync::OnceLock;

use blocksnap::bucket::BucketConfig;

/// The variables `scripts/ceph-rgw.sh env` prints, once the gateway is up;
/// `None` where it cannot run here.
pub fn gateway() -> Option<&'static Vec<(String, String)>> {
    static UP: OnceLock<Option<Vec<(String, String)>>> = OnceLock::new();
    UP.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ceph-rgw.sh");
        let required = std::env::var_os("BLOCKSNAP_REQUIRE_RGW").is_some();
        let installed = ["radosgw", "ceph-mon", "ceph-osd"].iter().all(|b| {
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {b}")])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if !installed && !required {
            eprintln!(
                "Ceph is not installed: the object-store tests are skipped \
                 (`scripts/ceph-rgw.sh install` installs it; CI does)"
            );
            return None;
        }
        let up = std::process::Command::new("bash")
            .arg(&script)
            .arg("up")
            .output()
            .expect("cannot run scripts/ceph-rgw.sh");
        assert!(
            up.status.success(),
            "radosgw could not be started: {}",
            String::from_utf8_lossy(&up.stderr)
        );
        let env = std::process::Command::new("bash")
            .arg(&script)
            .arg("env")
            .output()
            .expect("cannot run scripts/ceph-rgw.sh env");
        let vars = String::from_utf8_lossy(&env.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(vars)
    })
    .as_ref()
}

pub fn var(vars: &[(String, String)], name: &str) -> String {
    vars.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("scripts/ceph-rgw.sh env does not set {name}"))
}

pub fn config(vars: &[(String, String)]) -> BucketConfig {
    BucketConfig::from_env()
        .endpoint(&var(vars, "AWS_ENDPOINT_URL"))
        .region(&var(vars, "AWS_REGION"))
        .credentials(
            &var(vars, "AWS_ACCESS_KEY_ID"),
            &var(vars, "AWS_SECRET_ACCESS_KEY"),
        )
}

/// `s3://BUCKET/test-NAME-PID-NANOS`.
pub fn scratch_url(vars: &[(String, String)], name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{}/test-{name}-{}-{nanos}",
        var(vars, "BLOCKSNAP_TEST_BUCKET"),
        std::process::id()
    )
}
