//! A two-level segregated-fit (TLSF) index of free blocks: O(1) insert, remove and search.
//!
//! Sizes (in 512 B granules) map to a first level (the power of two) and a second level
//! (16 linear subdivisions of it). Each (first, second) class has an intrusive doubly linked
//! list threaded through the blocks' `prev_free`/`next_free` fields, and two bitmaps say which
//! lists are non-empty, so a search is a couple of `trailing_zeros`.
//!
//! Plain TLSF is "good fit": it rounds the request up to the next class boundary and takes
//! the head of the first non-empty list, which can waste up to 1/16 of the size. To get
//! closer to best fit we first look into the request's own class (whose blocks are within
//! 1/16 of the request, some smaller, some larger) and take the smallest block that fits
//! among its first few entries, and only then fall back to the rounded-up search.

use super::block::{Block, NIL};
use super::size::GRANULE;

const SL_BITS: u32 = 4;
const SL_COUNT: usize = 1 << SL_BITS;
/// Enough first levels for any size a `usize` can hold, in granules.
const FL_COUNT: usize = 64;
/// How many entries of the request's own class are examined for a better fit.
const OWN_CLASS_SCAN: usize = 8;

/// The free lists of one (stream, segment kind) pair.
#[derive(Debug)]
pub struct Tlsf {
    fl_bitmap: u64,
    sl_bitmap: [u32; FL_COUNT],
    heads: [[u32; SL_COUNT]; FL_COUNT],
}

impl Default for Tlsf {
    fn default() -> Self {
        Self {
            fl_bitmap: 0,
            sl_bitmap: [0; FL_COUNT],
            heads: [[NIL; SL_COUNT]; FL_COUNT],
        }
    }
}

/// The index key of a block size: its number of granules minus one. Sizes that are powers of
/// two (whole segments, typical requests) then sit at the top of their class, so a whole
/// segment that lends a little of its end keeps its class and its place in the lists.
#[inline]
fn key(size: usize) -> usize {
    size / GRANULE - 1
}

/// The class holding keys equal to `granules` (rounding down).
#[inline]
fn class_of(granules: usize) -> (usize, usize) {
    if granules < SL_COUNT {
        (0, granules)
    } else {
        let msb = usize::BITS - 1 - granules.leading_zeros();
        let fl = (msb - SL_BITS + 1) as usize;
        let sl = (granules >> (msb - SL_BITS)) - SL_COUNT;
        (fl, sl)
    }
}

/// The first class all of whose blocks are at least `granules` granules.
#[inline]
fn class_at_least(granules: usize) -> Option<(usize, usize)> {
    if granules < SL_COUNT {
        return Some((0, granules));
    }
    let msb = usize::BITS - 1 - granules.leading_zeros();
    let up = granules.checked_add((1usize << (msb - SL_BITS)) - 1)?;
    Some(class_of(up))
}

impl Tlsf {
    /// Whether no block is indexed here.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.fl_bitmap == 0
    }

    /// Whether block `i` is in the list of its class (walks the list).
    #[cfg(test)]
    pub fn contains(&self, blocks: &[Block], i: u32) -> bool {
        let (fl, sl) = class_of(key(blocks[i as usize].size));
        let mut j = self.heads[fl][sl];
        while j != NIL {
            if j == i {
                return true;
            }
            j = blocks[j as usize].next_free;
        }
        false
    }

    /// Whether blocks of `a` and `b` bytes live in the same list.
    #[inline]
    pub fn same_class(a: usize, b: usize) -> bool {
        class_of(key(a)) == class_of(key(b))
    }

    /// Pushes free block `i` at the head of its class list (LIFO: the most recently freed
    /// block, whose pages are warm, is reused first).
    pub fn insert(&mut self, blocks: &mut [Block], i: u32) {
        let (fl, sl) = class_of(key(blocks[i as usize].size));
        let head = self.heads[fl][sl];
        {
            let b = &mut blocks[i as usize];
            b.prev_free = NIL;
            b.next_free = head;
        }
        if head != NIL {
            blocks[head as usize].prev_free = i;
        }
        self.heads[fl][sl] = i;
        self.sl_bitmap[fl] |= 1 << sl;
        self.fl_bitmap |= 1 << fl;
    }

    /// Unlinks free block `i` from its class list.
    pub fn remove(&mut self, blocks: &mut [Block], i: u32) {
        let (prev, next, size) = {
            let b = &blocks[i as usize];
            (b.prev_free, b.next_free, b.size)
        };
        if next != NIL {
            blocks[next as usize].prev_free = prev;
        }
        if prev != NIL {
            blocks[prev as usize].next_free = next;
        } else {
            let (fl, sl) = class_of(key(size));
            self.heads[fl][sl] = next;
            if next == NIL {
                self.sl_bitmap[fl] &= !(1 << sl);
                if self.sl_bitmap[fl] == 0 {
                    self.fl_bitmap &= !(1 << fl);
                }
            }
        }
        let b = &mut blocks[i as usize];
        b.prev_free = NIL;
        b.next_free = NIL;
    }

    /// A free block of at least `size` bytes (a multiple of the granule), close to the
    /// smallest such block; `None` if there is none.
    pub fn find(&self, blocks: &[Block], size: usize) -> Option<u32> {
        let granules = key(size);
        // The request's own class: blocks within 1/16 of `size`, some of which may fit.
        let (fl, sl) = class_of(granules);
        let mut best = NIL;
        let mut best_size = usize::MAX;
        let mut i = self.heads[fl][sl];
        let mut seen = 0;
        while i != NIL && seen < OWN_CLASS_SCAN {
            let b = &blocks[i as usize];
            if b.size >= size && b.size < best_size {
                best = i;
                best_size = b.size;
                if b.size == size {
                    break;
                }
            }
            i = b.next_free;
            seen += 1;
        }
        if best != NIL {
            return Some(best);
        }
        // Every block of the first class above the request fits: take the head.
        let (fl, sl) = class_at_least(granules)?;
        if fl >= FL_COUNT {
            return None;
        }
        let sl_map = self.sl_bitmap[fl] & (u32::MAX << sl);
        if sl_map != 0 {
            return Some(self.heads[fl][sl_map.trailing_zeros() as usize]);
        }
        let above = if fl + 1 >= FL_COUNT {
            0
        } else {
            self.fl_bitmap & (u64::MAX << (fl + 1))
        };
        if above == 0 {
            return None;
        }
        let fl = above.trailing_zeros() as usize;
        let sl = self.sl_bitmap[fl].trailing_zeros() as usize;
        Some(self.heads[fl][sl])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::block::BlockState;

    fn free_block(size: usize) -> Block {
        Block {
            addr: 0,
            size,
            requested: 0,
            segment: 0,
            kind: 0,
            prev_phys: NIL,
            next_phys: NIL,
            prev_free: NIL,
            next_free: NIL,
            slot: 0,
            state: BlockState::Free,
            used_elsewhere: false,
            handle_owned: false,
            cached: false,
        }
    }

    #[test]
    fn classes_are_monotone_and_rounding_up_is_safe() {
        const N: usize = 200_000;
        let mut min_of_class = std::collections::HashMap::new();
        let mut last = (0, 0);
        for g in 1..N {
            let c = class_of(g);
            assert!(c >= last, "class_of not monotone at {g}");
            last = c;
            min_of_class.entry(c).or_insert(g);
        }
        // Every block in class_at_least(g) has at least g granules.
        for g in 1..N / 2 {
            let up = class_at_least(g).unwrap();
            assert!(up >= class_of(g));
            if let Some(&smallest) = min_of_class.get(&up) {
                assert!(smallest >= g, "g {g}: class {up:?} holds {smallest}");
            }
        }
        assert!(class_of(key(usize::MAX)).0 < FL_COUNT);
    }

    #[test]
    fn find_returns_the_smallest_fitting_block() {
        let sizes = [512usize, 4096, 8192, 1 << 20, 3 << 20, 5 << 20];
        let mut blocks: Vec<Block> = sizes.iter().map(|&s| free_block(s)).collect();
        let mut t = Tlsf::default();
        for i in 0..blocks.len() {
            t.insert(&mut blocks, i as u32);
        }
        // Brute force over requests: the found block must fit and no strictly smaller
        // fitting block may exist outside the 1/16 class tolerance.
        for req in (512..(6 << 20)).step_by(512 * 37) {
            let found = t.find(&blocks, req);
            let best = sizes.iter().copied().filter(|&s| s >= req).min();
            match (found, best) {
                (Some(i), Some(b)) => {
                    let s = blocks[i as usize].size;
                    assert!(s >= req);
                    assert!(s <= b + b / 16, "req {req}: got {s}, best {b}");
                }
                (None, None) => {}
                other => panic!("req {req}: {other:?}"),
            }
        }
        // Removing blocks empties the index.
        for i in 0..blocks.len() {
            t.remove(&mut blocks, i as u32);
        }
        assert!(t.is_empty());
        assert_eq!(t.find(&blocks, 512), None);
    }

    #[test]
    fn own_class_scan_prefers_an_exact_fit() {
        // Two blocks in the same class: 33 and 34 granules; a request of 34 granules must not
        // get the 33-granule block, and one of 33 granules should get the exact one.
        let mut blocks = vec![free_block(34 * 512), free_block(33 * 512)];
        assert!(Tlsf::same_class(34 * 512, 33 * 512));
        let mut t = Tlsf::default();
        t.insert(&mut blocks, 0);
        t.insert(&mut blocks, 1);
        assert_eq!(t.find(&blocks, 34 * 512), Some(0));
        assert_eq!(t.find(&blocks, 33 * 512), Some(1));
        assert_eq!(t.find(&blocks, 35 * 512), None);
        // A whole 2 MiB segment and the same less 512 B share a class.
        assert!(Tlsf::same_class(2 << 20, (2 << 20) - 512));
    }
}
