//! Names no method or context can have, through the C ABI: refused at once (a method name
//! with `KNIT_INVALID_ARGUMENT`, a context name with `KNIT_BAD_INPUT` as an empty one always
//! was), and never repeated whole in the error message.

use knit::{
    knit_client_close, knit_client_connect, knit_client_t, knit_context_get, knit_invoke,
    knit_invoke_ex, knit_last_error_message, knit_wait_for_method, KNIT_BAD_INPUT,
    KNIT_INVALID_ARGUMENT, KNIT_OK,
};
use knit_core::gateway::{Gateway, GatewayConfig};
use std::ffi::{CStr, CString};
use std::ptr::{null, null_mut};

fn last_error() -> String {
    // SAFETY: the library's thread-local message, valid until the next call on this thread.
    unsafe { CStr::from_ptr(knit_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

/// `knit_wait_for_method` with an empty name said `KNIT_NO_SERVER` where `knit_invoke` said
/// `KNIT_INVALID_ARGUMENT`; `knit_invoke_ex` with a 1 MiB name waited, said `KNIT_NO_SERVER`
/// and put the whole name in the message; `knit_context_get` of a 1 MiB name returned `KNIT_OK`.
#[test]
fn names_no_method_or_context_can_have_are_refused_at_once() {
    let dir = std::env::temp_dir().join(format!("knit-ffi-names-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let socket = dir.join("gw.sock");
    let gw = Gateway::bind(GatewayConfig::new(&socket))
        .expect("binding the gateway")
        .spawn()
        .expect("starting the gateway");
    let path = CString::new(socket.to_str().unwrap()).unwrap();
    let app = CString::new("names").unwrap();
    let mut client: *mut knit_client_t = null_mut();
    // SAFETY: valid strings and out pointer.
    let st = unsafe { knit_client_connect(path.as_ptr(), app.as_ptr(), 0, &mut client) };
    assert_eq!(st, KNIT_OK, "{}", last_error());

    let (empty, huge) = (
        CString::new("").unwrap(),
        CString::new("m".repeat(1 << 20)).unwrap(),
    );
    let mut out: *mut std::ffi::c_char = null_mut();
    for name in [&empty, &huge] {
        // SAFETY: a live client, valid strings and out pointers.
        unsafe {
            let st = knit_wait_for_method(client, name.as_ptr(), 0, &mut out);
            assert_eq!(st, KNIT_INVALID_ARGUMENT, "wait: {}", last_error());
            assert!(last_error().len() < 200, "{}", last_error().len());
            let st = knit_invoke_ex(client, name.as_ptr(), null(), null(), 0, 1000, &mut out);
            assert_eq!(st, KNIT_INVALID_ARGUMENT, "invoke_ex: {}", last_error());
            assert!(last_error().len() < 200, "{}", last_error().len());
            let st = knit_invoke(client, name.as_ptr(), null(), null(), 1000, &mut out);
            assert_eq!(st, KNIT_INVALID_ARGUMENT, "invoke: {}", last_error());
            let st = knit_context_get(client, name.as_ptr(), &mut out);
            assert_eq!(st, KNIT_BAD_INPUT, "context_get: {}", last_error());
            assert!(last_error().len() < 200, "{}", last_error().len());
        }
    }
    assert_eq!(knit_client_close(client), KNIT_OK);
    gw.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
