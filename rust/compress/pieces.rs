//! A gradient given as consecutive pieces — the parameters of a data-parallel bucket — that
//! compression reads in place, as if concatenated. Copying them into one buffer first would
//! cost a pass of reads and writes over the whole bucket per step (stores to lines not in
//! cache also read them), which is a visible share of a compressed step on a busy core.

/// Pieces with their start offsets in the concatenation.
pub struct Pieces<'a> {
    parts: &'a [&'a [f32]],
    /// `starts[p]`: index of piece p's first element; `starts[parts.len()]` = total length.
    starts: Vec<usize>,
}

impl<'a> Pieces<'a> {
    pub fn new(parts: &'a [&'a [f32]]) -> Self {
        let mut starts = Vec::with_capacity(parts.len() + 1);
        let mut at = 0usize;
        starts.push(0);
        for p in parts {
            at += p.len();
            starts.push(at);
        }
        Pieces { parts, starts }
    }

    pub fn len(&self) -> usize {
        self.starts[self.parts.len()]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` of the concatenation (`i < len`).
    #[inline]
    pub fn at(&self, i: usize) -> f32 {
        // The last start ≤ i belongs to a piece that holds i (empty pieces share their start
        // with the next piece, and `partition_point` skips past them).
        let p = self.starts.partition_point(|&s| s <= i) - 1;
        self.parts[p][i - self.starts[p]]
    }

    /// Calls `f(run, start)` for the runs of consecutive elements that make up `lo..hi`, in
    /// order (`start` is the run's first index in the concatenation), until `f` returns
    /// false.
    pub fn for_range(&self, lo: usize, hi: usize, mut f: impl FnMut(&[f32], usize) -> bool) {
        if lo >= hi {
            return;
        }
        let mut p = self.starts.partition_point(|&s| s <= lo) - 1;
        let mut at = lo;
        while at < hi && p < self.parts.len() {
            let (start, end) = (self.starts[p], self.starts[p + 1]);
            let stop = end.min(hi);
            if stop > at && !f(&self.parts[p][at - start..stop - start], at) {
                return;
            }
            at = at.max(stop);
            p += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_a_range_across_pieces_including_empty_ones() {
        let (a, b, c, d) = ([0.0f32, 1.0], [], [2.0f32, 3.0, 4.0], [5.0f32]);
        let parts: [&[f32]; 4] = [&a, &b, &c, &d];
        let p = Pieces::new(&parts);
        assert_eq!(p.len(), 6);
        let all: Vec<f32> = (0..6).map(|i| p.at(i)).collect();
        assert_eq!(all, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        for lo in 0..=6 {
            for hi in lo..=6 {
                let mut got = Vec::new();
                let mut next = lo;
                p.for_range(lo, hi, |run, start| {
                    assert_eq!(start, next, "runs are consecutive");
                    next += run.len();
                    got.extend_from_slice(run);
                    true
                });
                assert_eq!(got, all[lo..hi], "{lo}..{hi}");
            }
        }
        // Stopping early.
        let mut calls = 0;
        p.for_range(0, 6, |_, _| {
            calls += 1;
            false
        });
        assert_eq!(calls, 1);
    }
}
