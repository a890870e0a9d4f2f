//! Every status knit reports, from one table: the Rust [`Status`] enum, the CLI's exit codes,
//! the C ABI's `knit_status_t` values and `knit_status_string()`, and each binding's exception
//! families are all derived from [`STATUS_TABLE`]. Codes are stable: add rows, never renumber.

use serde::{Deserialize, Serialize};

/// One row of the catalogue.
#[derive(Debug, Clone, Copy)]
pub struct StatusInfo {
    /// The value (`KNIT_<NAME>` in C).
    pub code: i32,
    /// Upper-case name without prefix.
    pub name: &'static str,
    /// One-line description.
    pub message: &'static str,
    /// The `knit` CLI's exit code for it.
    pub exit_code: i32,
    /// Exception family for bindings: `usage`, `not_found`, `timeout`, `remote`, `connection`,
    /// `permission`, `input`, `internal`.
    pub family: &'static str,
}

macro_rules! statuses {
    ($( $variant:ident = $code:literal, $name:literal, $exit:literal, $family:literal, $msg:literal; )*) => {
        /// A knit status code. `Ok` is zero; errors are positive.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[repr(i32)]
        pub enum Status {
            $( #[doc = $msg] $variant = $code, )*
        }

        /// The catalogue, in code order.
        pub const STATUS_TABLE: &[StatusInfo] = &[
            $( StatusInfo { code: $code, name: $name, message: $msg, exit_code: $exit, family: $family }, )*
        ];

        impl Status {
            /// The status with this code, if any.
            pub fn from_code(code: i32) -> Option<Status> {
                match code { $( $code => Some(Status::$variant), )* _ => None }
            }
        }
    };
}

statuses! {
    Ok = 0, "OK", 0, "ok", "success";
    InvalidArgument = 1, "INVALID_ARGUMENT", 2, "usage", "invalid argument (NULL handle, empty name, bad option)";
    NoServer = 3, "NO_SERVER", 3, "not_found", "no server offers the method within the wait";
    Timeout = 4, "TIMEOUT", 4, "timeout", "no reply within the timeout";
    MethodFailed = 5, "METHOD_FAILED", 5, "remote", "the remote method failed";
    GatewayUnreachable = 6, "GATEWAY_UNREACHABLE", 6, "connection", "the gateway cannot be reached";
    PermissionDenied = 7, "PERMISSION_DENIED", 7, "permission", "permission denied";
    BadInput = 8, "BAD_INPUT", 8, "input", "bad input (invalid JSON or value)";
    PayloadTooLarge = 9, "PAYLOAD_TOO_LARGE", 8, "input", "payload larger than the gateway allows";
    PeerLeft = 10, "PEER_LEFT", 5, "remote", "peer has left while waiting for result";
    Disconnected = 11, "DISCONNECTED", 6, "connection", "the connection to the gateway is closed";
    AlreadyExists = 12, "ALREADY_EXISTS", 8, "input", "already exists (e.g. a method name registered twice)";
    NotFound = 13, "NOT_FOUND", 3, "not_found", "no such item (method, peer, context, subscription)";
    Closed = 14, "CLOSED", 2, "usage", "the handle is closed";
    Protocol = 15, "PROTOCOL", 6, "connection", "protocol violation or corrupt shared memory from a peer";
    Internal = 16, "INTERNAL", 1, "internal", "internal error (a bug in knit)";
    AlreadyRunning = 17, "ALREADY_RUNNING", 6, "connection", "another gateway already answers on this socket";
    Busy = 18, "BUSY", 4, "timeout", "resource exhausted or peer not keeping up";
}

impl Status {
    /// The catalogue row.
    pub fn info(self) -> &'static StatusInfo {
        STATUS_TABLE
            .iter()
            .find(|i| i.code == self as i32)
            .unwrap_or(&STATUS_TABLE[0])
    }
    /// The one-line description.
    pub fn message(self) -> &'static str {
        self.info().message
    }
    /// The CLI exit code.
    pub fn exit_code(self) -> i32 {
        self.info().exit_code
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for row in STATUS_TABLE {
            assert!(seen.insert(row.code), "duplicate code {}", row.code);
            let s = Status::from_code(row.code).unwrap();
            assert_eq!(s as i32, row.code);
            assert_eq!(s.info().name, row.name);
        }
        assert_eq!(Status::from_code(9999), None);
    }

    #[test]
    fn exit_codes_follow_the_cli_contract() {
        assert_eq!(Status::NoServer.exit_code(), 3);
        assert_eq!(Status::Timeout.exit_code(), 4);
        assert_eq!(Status::MethodFailed.exit_code(), 5);
        assert_eq!(Status::PeerLeft.exit_code(), 5);
        assert_eq!(Status::GatewayUnreachable.exit_code(), 6);
        assert_eq!(Status::PermissionDenied.exit_code(), 7);
        assert_eq!(Status::BadInput.exit_code(), 8);
        assert_eq!(Status::PayloadTooLarge.exit_code(), 8);
    }
}
