//! DDP-style bucketing: which gradients travel together, and where each sits in its bucket.

use super::CommError;

/// One gradient the scheduler knows about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GradInfo {
    pub name: String,
    /// Number of elements.
    pub numel: usize,
    /// Bytes per element.
    pub elem_bytes: usize,
    /// Dtype name; buckets never mix dtypes (a bucket is one flat array).
    pub dtype: String,
    /// Layer index, 0 = nearest the input (reported per bucket and operation).
    pub layer: u32,
}

impl GradInfo {
    pub fn bytes(&self) -> usize {
        self.numel * self.elem_bytes
    }
}

/// Bucket size limits, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketConfig {
    /// Limit of the first bucket: small so the first all-reduce starts early (DDP: 1 MiB).
    pub first_bucket_bytes: usize,
    /// Limit of every other bucket (DDP: 25 MiB).
    pub cap_bytes: usize,
    /// Close a bucket whenever the next gradient is of another layer, so no bucket spans
    /// two: ZeRO stage 3 gathers a layer from its buckets' parts, which are then whole
    /// buckets split evenly over the ranks rather than one rank's stretch of a shared one.
    pub split_layers: bool,
}

impl Default for BucketConfig {
    fn default() -> Self {
        BucketConfig {
            first_bucket_bytes: 1 << 20,
            cap_bytes: 25 << 20,
            split_layers: false,
        }
    }
}

/// Where one gradient sits in its bucket's flat buffer (in elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    pub grad: usize,
    pub offset: usize,
    pub numel: usize,
}

/// Gradients that are communicated as one flat array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub slices: Vec<Slice>,
    pub numel: usize,
    pub elem_bytes: usize,
    pub dtype: String,
    /// The lowest layer among its gradients.
    pub layer: u32,
}

impl Bucket {
    /// An empty bucket for gradients of `g`'s dtype (and, so far, its layer).
    fn starting_with(g: &GradInfo) -> Bucket {
        Bucket {
            slices: Vec::new(),
            numel: 0,
            elem_bytes: g.elem_bytes,
            dtype: g.dtype.clone(),
            layer: g.layer,
        }
    }

    pub fn bytes(&self) -> usize {
        self.numel * self.elem_bytes
    }
}

/// Checks the gradient list (non-empty, positive sizes, one element size per dtype).
pub fn check_grads(grads: &[GradInfo]) -> Result<(), CommError> {
    if grads.is_empty() {
        return Err(CommError::Empty);
    }
    for (index, g) in grads.iter().enumerate() {
        let bad = |what: String| CommError::BadGrad {
            index,
            name: g.name.clone(),
            what,
        };
        if g.elem_bytes == 0 {
            return Err(bad("an element size of 0 bytes".into()));
        }
        if g.numel.checked_mul(g.elem_bytes).is_none() {
            return Err(bad("a size in bytes that overflows".into()));
        }
        if let Some(other) = grads[..index]
            .iter()
            .find(|o| o.dtype == g.dtype && o.elem_bytes != g.elem_bytes)
        {
            return Err(bad(format!(
                "dtype {:?} with {} bytes per element, but {:?} has it with {}",
                g.dtype, g.elem_bytes, other.name, other.elem_bytes
            )));
        }
    }
    Ok(())
}

/// Checks that `order` is a permutation of `0..n`.
pub fn check_order(order: &[usize], n: usize) -> Result<(), CommError> {
    if order.len() != n {
        return Err(CommError::BadOrder(format!(
            "order has {} entries, there are {n} gradients",
            order.len()
        )));
    }
    let mut seen = vec![false; n];
    for &i in order {
        if i >= n || std::mem::replace(&mut seen[i], true) {
            return Err(CommError::BadOrder(format!(
                "order is not a permutation of 0..{n} (entry {i})"
            )));
        }
    }
    Ok(())
}

/// Groups gradients into buckets, visiting them in `order` (DDP: reverse registration order
/// at first, the observed ready order after the rebuild). Each dtype fills its own open
/// bucket; a bucket closes once it reaches its limit (the first bucket closed uses
/// `first_bucket_bytes`, later ones `cap_bytes`), so a single gradient larger than the cap
/// gets a bucket of its own. Buckets come out in the order they closed (the open ones last),
/// which is the order they are expected to fill during backward.
pub fn assign_buckets(
    grads: &[GradInfo],
    order: &[usize],
    cfg: BucketConfig,
) -> Result<Vec<Bucket>, CommError> {
    check_grads(grads)?;
    check_order(order, grads.len())?;
    if cfg.first_bucket_bytes == 0 || cfg.cap_bytes == 0 {
        return Err(CommError::BadConfig(
            "bucket limits must be at least 1 byte".into(),
        ));
    }
    let mut done: Vec<Bucket> = Vec::new();
    let mut open: Vec<Bucket> = Vec::new();
    for &gi in order {
        let g = &grads[gi];
        let pos = match open.iter().position(|b| b.dtype == g.dtype) {
            Some(p) => p,
            None => {
                open.push(Bucket::starting_with(g));
                open.len() - 1
            }
        };
        let other_layer = |b: &Bucket| {
            b.slices
                .last()
                .is_some_and(|s| grads[s.grad].layer != g.layer)
        };
        let pos = if cfg.split_layers && other_layer(&open[pos]) {
            done.push(open.remove(pos));
            open.push(Bucket::starting_with(g));
            open.len() - 1
        } else {
            pos
        };
        let b = &mut open[pos];
        b.slices.push(Slice {
            grad: gi,
            offset: b.numel,
            numel: g.numel,
        });
        b.numel += g.numel;
        b.layer = b.layer.min(g.layer);
        let limit = if done.is_empty() {
            cfg.first_bucket_bytes
        } else {
            cfg.cap_bytes
        };
        if b.bytes() >= limit {
            done.push(open.remove(pos));
        }
    }
    done.extend(open);
    Ok(done)
}

/// Reverse registration order, DDP's initial guess at the order gradients become ready.
pub fn reverse_order(n: usize) -> Vec<usize> {
    (0..n).rev().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn grad(name: &str, numel: usize, layer: u32) -> GradInfo {
        GradInfo {
            name: name.into(),
            numel,
            elem_bytes: 4,
            dtype: "float32".into(),
            layer,
        }
    }

    #[test]
    fn ddp_limits_first_small_then_capped() {
        // 1 MiB = 262144 floats. Reverse order: d, c, b, a.
        let g = vec![
            grad("a", 300_000, 0),
            grad("b", 100_000, 1),
            grad("c", 200_000, 2),
            grad("d", 100_000, 3),
        ];
        let cfg = BucketConfig::default();
        let b = assign_buckets(&g, &reverse_order(4), cfg).unwrap();
        // d (400 KB) + c (800 KB) = 1.2 MB >= 1 MiB closes the first bucket; b + a stay
        // below 25 MiB and form the last (open) bucket.
        assert_eq!(b.len(), 2);
        assert_eq!(
            b[0].slices.iter().map(|s| s.grad).collect::<Vec<_>>(),
            vec![3, 2]
        );
        assert_eq!(b[0].slices[1].offset, 100_000);
        assert_eq!(b[0].layer, 2);
        assert_eq!(
            b[1].slices.iter().map(|s| s.grad).collect::<Vec<_>>(),
            vec![1, 0]
        );
        assert_eq!(b[1].numel, 400_000);
        assert_eq!(b[1].layer, 0);
    }

    #[test]
    fn oversized_gradient_gets_its_own_bucket() {
        let g = vec![grad("x", 10, 0), grad("big", 1000, 1), grad("y", 10, 2)];
        let cfg = BucketConfig {
            first_bucket_bytes: 16,
            cap_bytes: 100,
            split_layers: false,
        };
        let b = assign_buckets(&g, &[2, 1, 0], cfg).unwrap();
        let sets: Vec<Vec<usize>> = b
            .iter()
            .map(|b| b.slices.iter().map(|s| s.grad).collect())
            .collect();
        assert_eq!(sets, vec![vec![2], vec![1], vec![0]]);
    }

    #[test]
    fn split_layers_never_lets_a_bucket_span_two_layers() {
        // Layers 3 3 2 2 1 0 in ready order, caps far above everything: one bucket
        // without the split, one per layer with it (grouped as the order has them).
        let layers = [0, 1, 2, 2, 3, 3];
        let g: Vec<GradInfo> = layers
            .iter()
            .enumerate()
            .map(|(i, &l)| grad(&format!("g{i}"), 10, l))
            .collect();
        let order = [5, 4, 3, 2, 1, 0];
        let mut cfg = BucketConfig {
            first_bucket_bytes: 1 << 20,
            cap_bytes: 1 << 20,
            split_layers: false,
        };
        assert_eq!(assign_buckets(&g, &order, cfg).unwrap().len(), 1);
        cfg.split_layers = true;
        let sets: Vec<Vec<usize>> = assign_buckets(&g, &order, cfg)
            .unwrap()
            .iter()
            .map(|b| b.slices.iter().map(|s| s.grad).collect())
            .collect();
        assert_eq!(sets, vec![vec![5, 4], vec![3, 2], vec![1], vec![0]]);
    }

    #[test]
    fn dtypes_never_mix() {
        let mut h = grad("h", 10, 1);
        h.dtype = "float16".into();
        h.elem_bytes = 2;
        let g = vec![grad("a", 10, 0), h, grad("b", 10, 2)];
        let b = assign_buckets(&g, &[2, 1, 0], BucketConfig::default()).unwrap();
        assert_eq!(b.len(), 2);
        assert!(b
            .iter()
            .all(|b| b.slices.iter().all(|s| g[s.grad].dtype == b.dtype)));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            assign_buckets(&[], &[], BucketConfig::default()),
            Err(CommError::Empty)
        );
        let g = vec![grad("a", 1, 0), grad("b", 1, 0)];
        assert!(matches!(
            assign_buckets(&g, &[0, 0], BucketConfig::default()),
            Err(CommError::BadOrder(_))
        ));
        assert!(matches!(
            assign_buckets(&g, &[0], BucketConfig::default()),
            Err(CommError::BadOrder(_))
        ));
        let mut bad = g.clone();
        bad[1].elem_bytes = 0;
        assert!(matches!(
            assign_buckets(&bad, &[0, 1], BucketConfig::default()),
            Err(CommError::BadGrad { index: 1, .. })
        ));
        let mut mixed = g.clone();
        mixed[1].elem_bytes = 8;
        assert!(matches!(
            assign_buckets(&mixed, &[0, 1], BucketConfig::default()),
            Err(CommError::BadGrad { index: 1, .. })
        ));
    }
}
