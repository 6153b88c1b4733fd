//! Regions the caller registers: carved like segments, never given back to the backing.

use super::super::block::{BlockState, NIL};
use super::super::error::PoolError;
use super::super::size::{round_down, round_up, GRANULE};
use super::super::stats::StatPool;
use super::segment::SegmentKind;
use super::Pool;

impl Pool {
    /// Registers an external arena `[base, base + size)`: the pool carves blocks from it
    /// (after aligning it to 512 B) and never frees it. The arena counts as reserved memory.
    pub fn register_arena(&mut self, base: usize, size: usize) -> Result<(), PoolError> {
        let end = base
            .checked_add(size)
            .ok_or(PoolError::ArenaTooSmall { base, size })?;
        let start = round_up(base, GRANULE).ok_or(PoolError::ArenaTooSmall { base, size })?;
        let stop = round_down(end, GRANULE);
        if base == 0 || stop <= start {
            return Err(PoolError::ArenaTooSmall { base, size });
        }
        if self.overlaps(start, stop) {
            return Err(PoolError::ArenaOverlap { base, size });
        }
        let s = self.add_segment(start, stop - start, SegmentKind::Arena, (base, size));
        let b = self.segment(s).first;
        self.link_free(b);
        self.refresh_wholly_free(s);
        self.update_inactive_split(StatPool::Large);
        Ok(())
    }

    /// Removes the arena registered at `base`; it must have no live (allocated or pending)
    /// block. The pool forgets it; the memory stays the caller's.
    pub fn unregister_arena(&mut self, base: usize) -> Result<(), PoolError> {
        let s = self
            .segment_at
            .values()
            .copied()
            .find(|&s| {
                let seg = self.segment(s);
                seg.kind == SegmentKind::Arena && seg.registered.0 == base
            })
            .ok_or(PoolError::UnknownArena { base })?;
        let mut live = 0;
        let mut b = self.segment(s).first;
        while b != NIL {
            if self.blocks.get(b).state != BlockState::Free {
                live += 1;
            }
            b = self.blocks.get(b).next_phys;
        }
        if live > 0 {
            return Err(PoolError::ArenaInUse { base, live });
        }
        self.remove_segment(s);
        self.update_inactive_split(StatPool::Large);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::tests::{check, MIB};
    use crate::pool::*;

    #[test]
    fn arenas_are_carved_and_never_freed_by_the_pool() {
        let mut p = Pool::new(Box::new(ArenasOnly), None);
        assert!(matches!(
            p.malloc(512, 0),
            Err(PoolError::BackingExhausted { .. })
        ));
        let base = 0x1000_0000 + 100; // unaligned on purpose
        p.register_arena(base, 4 * MIB).unwrap();
        let snap = p.snapshot();
        assert_eq!(snap[0].address, 0x1000_0000 + 512);
        assert_eq!(snap[0].size, 4 * MIB - 512);
        assert_eq!(snap[0].kind, SegmentKind::Arena);
        assert_eq!(
            p.register_arena(0x1000_0000 + MIB, MIB),
            Err(PoolError::ArenaOverlap {
                base: 0x1000_0000 + MIB,
                size: MIB
            })
        );
        assert!(matches!(
            p.register_arena(0x2000_0000 + 1, 600),
            Err(PoolError::ArenaTooSmall { .. })
        ));
        // Small and large requests both come from the arena.
        let a = p.malloc(1000, 0).unwrap();
        let b = p.malloc(2 * MIB, 0).unwrap();
        assert!(a >= 0x1000_0000 && b + 2 * MIB <= base + 4 * MIB);
        assert!(p.malloc(2 * MIB, 0).is_err());
        check(&p);
        assert_eq!(p.empty_cache(), 0);
        assert_eq!(
            p.unregister_arena(base),
            Err(PoolError::ArenaInUse { base, live: 2 })
        );
        p.free(a).unwrap();
        p.free(b).unwrap();
        assert_eq!(p.empty_cache(), 0, "arenas are not the pool's to free");
        p.unregister_arena(base).unwrap();
        assert_eq!(
            p.unregister_arena(base),
            Err(PoolError::UnknownArena { base })
        );
        assert_eq!(p.stats().reserved_bytes.all().current, 0);
        check(&p);
    }
}
