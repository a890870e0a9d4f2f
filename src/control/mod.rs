//! The control socket: where it lives and who may use it.
//!
//! Default address: `$XDG_RUNTIME_DIR/knit/gateway.sock`, else `/tmp/knit-<uid>/gateway.sock`;
//! `KNIT_GATEWAY` overrides both. The directory must be ours and closed to everybody else
//! (mode 0700): the gateway creates it so (and refuses an existing one open to others, tightening
//! only its own default directory), and a client refuses to connect through a directory another
//! user could have planted a socket in. On top of that the gateway accepts only
//! connections whose kernel-reported uid is its own.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Environment variable naming the gateway socket.
pub const ENV_GATEWAY: &str = "KNIT_GATEWAY";

/// The default socket path for this user.
pub fn default_socket_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("knit").join("gateway.sock"),
        None => PathBuf::from(format!("/tmp/knit-{}", crate::sys::identity::euid()))
            .join("gateway.sock"),
    }
}

/// The socket path to use: the explicit one, else `KNIT_GATEWAY`, else the default.
pub fn resolve_socket_path(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    match std::env::var_os(ENV_GATEWAY).filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => default_socket_path(),
    }
}

/// The file next to the gateway socket `socket` that users handle, its `what` (`token`): a
/// `.sock` extension is replaced (`gateway.sock` → `gateway.token`), any other name gets
/// `.what` appended (`gw.one` → `gw.one.token`). `gw` and `gw.sock` share one (harmless for
/// the token: a gateway reuses a valid token file); the gateway's own files use [`own_file`].
pub fn sibling(socket: &Path, what: &str) -> PathBuf {
    let name = socket
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".sock").filter(|s| !s.is_empty());
    socket.with_file_name(format!("{}.{what}", stem.unwrap_or(&name)))
}

/// The gateway's own file `what` (`lock`, `keeper`) for the socket `socket`: the socket's whole
/// name with `.what` appended (`gateway.sock` → `gateway.sock.lock`). Unlike [`sibling`] this
/// is one-to-one, so no two sockets in a directory (`gw` and `gw.sock` included) share a
/// gateway's lock or keeper; [`sibling`] names the one file users handle, the token.
pub fn own_file(socket: &Path, what: &str) -> PathBuf {
    let mut name = socket.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(what);
    socket.with_file_name(name)
}

/// Creates `dir` (mode 0700) if missing and refuses it if it is not ours or is open to others.
/// Only knit's own default directory ([`default_socket_path`]'s) is tightened when it is open:
/// any other directory was made by someone for something else (`/tmp`, a home directory), and
/// changing its mode would break whatever else lives there.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    let knits_own = default_socket_path().parent() == Some(dir);
    ensure_private_dir_as(dir, knits_own)
}

/// [`ensure_private_dir`], tightening an open `dir` of ours only if `tighten`.
fn ensure_private_dir_as(dir: &Path, tighten: bool) -> io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    let md = std::fs::symlink_metadata(dir)?;
    if !md.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a directory", dir.display()),
        ));
    }
    if md.uid() != crate::sys::identity::euid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} belongs to uid {}, not to us", dir.display(), md.uid()),
        ));
    }
    if md.mode() & 0o077 != 0 {
        if !tighten {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is open to other users (mode {:o}); the gateway's socket needs a \
                     directory private to this user: make one (`mkdir -m 700 DIR`), or leave \
                     the socket path out for the default",
                    dir.display(),
                    md.mode() & 0o7777
                ),
            ));
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// The directory a socket path names its socket in: `.` for a bare name (`gw.sock`, whose
/// `parent()` is the empty path, which names no directory).
pub fn socket_dir(socket: &Path) -> &Path {
    match socket.parent() {
        None => Path::new("/"),
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
    }
}

/// Checks that the socket's directory is ours and private before we trust what answers there.
pub fn check_private_dir(socket: &Path) -> io::Result<()> {
    let dir = socket_dir(socket);
    let md = std::fs::metadata(dir)?;
    if md.uid() != crate::sys::identity::euid() || md.mode() & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} must be owned by this user with mode 0700",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Connects to the gateway socket through `interprocess`, returning a plain blocking stream.
pub fn connect(socket: &Path) -> io::Result<std::os::unix::net::UnixStream> {
    use interprocess::local_socket::{prelude::*, GenericFilePath, Stream};
    check_private_dir(socket)?;
    let name = socket.to_fs_name::<GenericFilePath>()?;
    let stream = Stream::connect(name)?;
    let Stream::UdSocket(s) = stream;
    s.inner().try_clone()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sibling_files_replace_a_sock_extension_and_are_appended_to_any_other_name() {
        let at = |n: &str| sibling(Path::new(n), "token");
        assert_eq!(at("/r/gateway.sock"), Path::new("/r/gateway.token"));
        assert_eq!(at("/r/gw.one"), Path::new("/r/gw.one.token"));
        assert_eq!(at("/r/gw.two"), Path::new("/r/gw.two.token"));
        assert_eq!(at("/r/gw"), Path::new("/r/gw.token"));
        assert_eq!(at("/r/.sock"), Path::new("/r/.sock.token"));
    }

    #[test]
    fn own_files_append_to_the_whole_name_so_no_two_sockets_share_them() {
        let at = |n: &str| own_file(Path::new(n), "lock");
        assert_eq!(at("/r/gateway.sock"), Path::new("/r/gateway.sock.lock"));
        assert_eq!(at("/r/gw"), Path::new("/r/gw.lock"));
        assert_ne!(at("/r/gw"), at("/r/gw.sock"));
        assert_ne!(at("/r/gw.one"), at("/r/gw.two"));
        assert_eq!(
            own_file(Path::new("/r/gateway.sock"), "keeper"),
            Path::new("/r/gateway.sock.keeper")
        );
    }

    use super::*;

    #[test]
    fn a_private_dir_is_created_0700_and_only_knits_own_is_tightened() {
        let base = std::env::temp_dir().join(format!("knit-dir-test-{}", std::process::id()));
        let dir = base.join("a");
        ensure_private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        // Someone else's directory (here: one opened after the fact) keeps its mode and is
        // refused, naming it.
        for mode in [0o755, 0o1777, 0o710] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
            assert!(check_private_dir(&dir.join("s.sock")).is_err());
            let e = ensure_private_dir(&dir).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
            assert!(e.to_string().contains("open to other users"), "{e}");
            assert!(e.to_string().contains(&format!("{mode:o}")), "{e}");
            assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, mode);
        }
        // knit's own default directory is tightened.
        ensure_private_dir_as(&dir, true).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        check_private_dir(&dir.join("s.sock")).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_bare_socket_name_lives_in_the_current_directory() {
        assert_eq!(socket_dir(Path::new("gw.sock")), Path::new("."));
        assert_eq!(socket_dir(Path::new("./gw.sock")), Path::new("."));
        assert_eq!(socket_dir(Path::new("d/gw.sock")), Path::new("d"));
        assert_eq!(socket_dir(Path::new("/r/gw.sock")), Path::new("/r"));
        assert_eq!(socket_dir(Path::new("/")), Path::new("/"));
    }

    #[test]
    fn explicit_path_wins() {
        assert_eq!(
            resolve_socket_path(Some(Path::new("/x/y.sock"))),
            PathBuf::from("/x/y.sock")
        );
    }
}
