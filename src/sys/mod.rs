//! Operating-system calls. Everything knit asks of the kernel enters here, through rustix, and
//! leaves as `std::io::Error` or a typed error of the layer above.

pub(crate) mod accept;
pub mod affinity;
pub(crate) mod fdpass;
pub(crate) mod futex;
pub mod identity;
pub mod limits;
pub(crate) mod memfd;
pub(crate) mod mmap;
pub mod process;
