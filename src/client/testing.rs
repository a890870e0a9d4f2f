//! Tests only: a gateway of their own for the client's unit tests, in a fresh directory, shut
//! down (and the directory removed) when dropped.

use crate::gateway::{Gateway, GatewayConfig, GatewayHandle};
use std::path::{Path, PathBuf};

pub(crate) struct TestGateway {
    dir: PathBuf,
    socket: PathBuf,
    gw: Option<GatewayHandle>,
}

impl TestGateway {
    /// A gateway on a socket in a directory named after `tag` (unique per test).
    pub(crate) fn new(tag: &str) -> TestGateway {
        let dir = std::env::temp_dir().join(format!("knit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // Private: the gateway refuses a socket directory open to others.
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .recursive(true)
            .create(&dir)
            .unwrap();
        let socket = dir.join("gw.sock");
        let gw = Gateway::bind(GatewayConfig::new(&socket))
            .unwrap()
            .spawn()
            .unwrap();
        TestGateway {
            dir,
            socket,
            gw: Some(gw),
        }
    }

    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(gw) = self.gw.take() {
            gw.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
