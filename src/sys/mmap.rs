//! An owned, shared, read-write mapping. It hands out raw pointers only: the memory is written
//! by other processes at the same time, so references to it would be a lie to the compiler.

use rustix::mm::{self, MapFlags, ProtFlags};
use std::io;
use std::os::fd::AsFd;
use std::ptr::NonNull;

/// A `MAP_SHARED` mapping of a whole file, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `Mapping` is a pointer and a length; the mapping is valid from any thread, and all
// access to its contents goes through raw pointers and atomics chosen by the layers above.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` exposes only the address and the length.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` shared, readable and writable.
    pub(crate) fn map(fd: impl AsFd, len: usize) -> io::Result<Self> {
        Self::map_with(fd, len, ProtFlags::READ | ProtFlags::WRITE)
    }

    /// Maps `len` bytes of `fd` shared and read-only (writes to it fault).
    pub(crate) fn map_readonly(fd: impl AsFd, len: usize) -> io::Result<Self> {
        Self::map_with(fd, len, ProtFlags::READ)
    }

    fn map_with(fd: impl AsFd, len: usize, prot: ProtFlags) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // SAFETY: we ask the kernel for a fresh mapping (no fixed address), so no existing
        // memory is affected; the result is checked before use.
        let ptr = unsafe {
            mm::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                MapFlags::SHARED,
                fd.as_fd(),
                0,
            )?
        };
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null pointer"))?;
        Ok(Self { ptr, len })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned and nothing else unmaps them; every
        // user of the memory holds this `Mapping` (through an `Arc`) for as long as it reads it.
        unsafe {
            let _ = mm::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}
