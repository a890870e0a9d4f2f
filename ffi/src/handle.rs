//! Handles that survive misuse: what the C side holds is not a pointer but a tagged slot number.
//!
//! A handle is `generation << 32 | kind << 24 | (index + 1)`, cast to the opaque pointer type.
//! Nothing ever dereferences it: every call looks the value up in a [`Table`], so a NULL handle,
//! a handle of the wrong kind, garbage, or a handle whose object was closed (its slot's
//! generation moved on) is reported as a status, never a crash. A slot whose generation reaches
//! `u32::MAX` is retired rather than reused, so a stale handle can never name a newer object.

use knit_core::Status;

/// Handle kinds (bits 24..32), so a reply handle passed as a client is recognised as wrong.
pub(crate) const KIND_CLIENT: u8 = 0x4b; // 'K'
pub(crate) const KIND_REPLY: u8 = 0x52; // 'R'
pub(crate) const KIND_SUBSCRIPTION: u8 = 0x53; // 'S'
pub(crate) const KIND_STREAM: u8 = 0x54; // 'T'
pub(crate) const KIND_REQUEST: u8 = 0x51; // 'Q'
pub(crate) const KIND_SUBSCRIBER: u8 = 0x55; // 'U'

const INDEX_BITS: u32 = 24;
const INDEX_MASK: usize = (1 << INDEX_BITS) - 1;

// The encoding needs 64 bits (32 for the generation). knit targets 64-bit Linux first.
const _: () = assert!(
    usize::BITS == 64,
    "knit's C ABI handles need a 64-bit target"
);

/// Why a handle did not resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandleError {
    /// The handle is NULL.
    Null,
    /// Not a handle of this kind (garbage, or another kind of handle).
    Invalid,
    /// A handle of this kind whose object is gone (closed, or answered for replies).
    Stale,
    /// The table is full (16 M live objects of one kind).
    Full,
}

impl HandleError {
    pub(crate) fn status(self) -> Status {
        match self {
            HandleError::Null | HandleError::Invalid => Status::InvalidArgument,
            HandleError::Stale => Status::Closed,
            HandleError::Full => Status::Busy,
        }
    }
}

struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

/// A slab of objects addressed by generation-checked handles. Not synchronised: the statics
/// wrap it in a lock.
pub(crate) struct Table<T> {
    kind: u8,
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
}

impl<T> Table<T> {
    pub(crate) const fn new(kind: u8) -> Self {
        Self {
            kind,
            slots: Vec::new(),
            free: Vec::new(),
        }
    }

    fn encode(&self, index: usize, generation: u32) -> usize {
        ((generation as usize) << 32) | ((self.kind as usize) << INDEX_BITS) | (index + 1)
    }

    fn decode(&self, h: usize) -> Result<(usize, u32), HandleError> {
        if h == 0 {
            return Err(HandleError::Null);
        }
        if (h >> INDEX_BITS) & 0xff != self.kind as usize {
            return Err(HandleError::Invalid);
        }
        let index = (h & INDEX_MASK).wrapping_sub(1);
        let generation = (h >> 32) as u32;
        match self.slots.get(index) {
            Some(s) if s.generation == generation && s.value.is_some() => Ok((index, generation)),
            // An older generation of a slot we have: the object it named is gone.
            Some(s) if generation != 0 && generation <= s.generation => Err(HandleError::Stale),
            _ => Err(HandleError::Invalid),
        }
    }

    /// Stores `value`; returns its handle.
    pub(crate) fn insert(&mut self, value: T) -> Result<usize, (HandleError, T)> {
        if let Some(index) = self.free.pop() {
            let s = &mut self.slots[index as usize];
            s.value = Some(value);
            let generation = s.generation;
            return Ok(self.encode(index as usize, generation));
        }
        let index = self.slots.len();
        if index >= INDEX_MASK {
            return Err((HandleError::Full, value));
        }
        self.slots.push(Slot {
            generation: 1,
            value: Some(value),
        });
        Ok(self.encode(index, 1))
    }

    /// The object `h` names.
    pub(crate) fn get(&self, h: usize) -> Result<&T, HandleError> {
        let (index, _) = self.decode(h)?;
        self.slots[index].value.as_ref().ok_or(HandleError::Stale)
    }

    /// Takes the object `h` names out; `h` is stale from now on.
    pub(crate) fn remove(&mut self, h: usize) -> Result<T, HandleError> {
        let (index, _) = self.decode(h)?;
        self.vacate(index).ok_or(HandleError::Stale)
    }

    fn vacate(&mut self, index: usize) -> Option<T> {
        let s = &mut self.slots[index];
        let v = s.value.take()?;
        if s.generation < u32::MAX {
            s.generation += 1;
            self.free.push(index as u32);
        }
        Some(v)
    }

    /// Takes out every object `pred` selects.
    pub(crate) fn remove_where(&mut self, mut pred: impl FnMut(&T) -> bool) -> Vec<T> {
        let hits: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.value.as_ref().is_some_and(&mut pred))
            .map(|(i, _)| i)
            .collect();
        hits.into_iter().filter_map(|i| self.vacate(i)).collect()
    }

    /// The first live object `pred` selects.
    pub(crate) fn get_where(&self, mut pred: impl FnMut(&T) -> bool) -> Option<&T> {
        self.slots
            .iter()
            .filter_map(|s| s.value.as_ref())
            .find(|v| pred(v))
    }

    /// Live objects.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.value.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_handles_are_stale_and_slots_are_reused_with_a_new_generation() {
        let mut t = Table::new(KIND_CLIENT);
        let a = t.insert("a").unwrap();
        assert_eq!(t.get(a), Ok(&"a"));
        assert_eq!(t.remove(a), Ok("a"));
        assert_eq!(t.get(a), Err(HandleError::Stale));
        assert_eq!(t.remove(a), Err(HandleError::Stale));
        let b = t.insert("b").unwrap();
        assert_ne!(a, b, "a reused slot gets a new handle value");
        assert_eq!(a & INDEX_MASK, b & INDEX_MASK, "the slot was reused");
        assert_eq!(t.get(a), Err(HandleError::Stale));
        assert_eq!(t.get(b), Ok(&"b"));
    }

    #[test]
    fn null_garbage_and_foreign_kinds_are_invalid() {
        let mut clients = Table::new(KIND_CLIENT);
        let mut replies = Table::new(KIND_REPLY);
        let c = clients.insert(1).unwrap();
        let r = replies.insert(2).unwrap();
        assert_eq!(clients.get(0), Err(HandleError::Null));
        assert_eq!(clients.get(r), Err(HandleError::Invalid));
        assert_eq!(replies.get(c), Err(HandleError::Invalid));
        assert_eq!(clients.get(0xdead_beef), Err(HandleError::Invalid));
        assert_eq!(clients.get(usize::MAX), Err(HandleError::Invalid));
        // A generation from the future is garbage, not "closed".
        assert_eq!(clients.get(c + (5 << 32)), Err(HandleError::Invalid));
    }

    #[test]
    fn a_slot_is_retired_when_its_generation_is_exhausted() {
        let mut t = Table::new(KIND_REPLY);
        let h = t.insert(()).unwrap();
        t.slots[0].generation = u32::MAX;
        let h = (h & 0xffff_ffff) | ((u32::MAX as usize) << 32);
        assert!(t.remove(h).is_ok());
        assert!(t.free.is_empty());
        let h2 = t.insert(()).unwrap();
        assert_eq!(h2 & INDEX_MASK, 2, "a fresh slot, not the retired one");
    }

    #[test]
    fn remove_where_takes_only_matches() {
        let mut t = Table::new(KIND_REPLY);
        let hs: Vec<usize> = (0..6).map(|i| t.insert(i).unwrap()).collect();
        let mut odd = t.remove_where(|v| v % 2 == 1);
        odd.sort();
        assert_eq!(odd, vec![1, 3, 5]);
        assert_eq!(t.len(), 3);
        assert_eq!(t.get(hs[1]), Err(HandleError::Stale));
        assert_eq!(t.get(hs[2]), Ok(&2));
    }
}
