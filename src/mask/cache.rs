//! A bounded least-recently-used cache of block maps, so that repeated calls
//! of one compiled kernel with the same shapes, offsets, lengths and mask
//! buffers never rebuild their maps.
//!
//! A map depends on the spec (fixed per cache), the tiling, the shapes, the
//! query and key positions (offsets, per-sequence lengths) and the contents
//! of the buffers the mask reads ([`crate::sema::Spec::mask_buffers`]);
//! nothing else (not K, V, the page table or the buffers only the score
//! reads). An entry keeps a copy of those buffers and a hit compares them
//! element by element, so a changed buffer can never reuse a stale map.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::{classify_observed, BlockMaps, MaskError, Tiling};
use crate::bind::Bound;
use crate::buffer::BufferData;
use crate::sema::eval::Shapes;
use crate::sema::Spec;

/// Mask buffers larger than this (in all) are not copied into the cache: their
/// maps are built per call.
pub const MAX_CACHED_BUFFER_BYTES: usize = 64 << 20;

/// What a block map was built from.
#[derive(Debug)]
struct Key {
    tiling: Tiling,
    shapes: Shapes,
    q_offset: i64,
    kv_offset: i64,
    kv_rows: usize,
    kv_lens: Option<Vec<usize>>,
    buffers: Vec<BufferData>,
}

impl Key {
    fn matches(&self, bound: &Bound, tiling: Tiling, ids: &[usize]) -> bool {
        self.tiling == tiling
            && self.shapes == bound.shapes
            && self.q_offset == bound.q_offset
            && self.kv_offset == bound.kv_offset
            && self.kv_rows == bound.kv_rows
            && self.kv_lens == bound.kv_lens
            && ids
                .iter()
                .zip(&self.buffers)
                .all(|(&i, b)| bound.buffers[i].same_bits(b))
    }
}

/// Block maps of the last few distinct problems of one spec, most recent first.
#[derive(Debug)]
pub struct MapCache {
    entries: Mutex<VecDeque<(Key, Arc<BlockMaps>)>>,
    capacity: usize,
}

impl MapCache {
    /// A cache of at most `capacity` maps (0 keeps none).
    pub fn new(capacity: usize) -> MapCache {
        MapCache {
            entries: Mutex::new(VecDeque::new()),
            capacity,
        }
    }

    /// Maps held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Key, Arc<BlockMaps>)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The block maps of `spec` on `bound` under `tiling`: a cached one when
    /// an entry matches, else built by [`super::classify`] and kept (evicting the
    /// least recently used entry past the capacity). Errors are not cached.
    pub fn get_or_build(
        &self,
        spec: &Spec,
        bound: &Bound,
        tiling: Tiling,
    ) -> Result<Arc<BlockMaps>, MaskError> {
        self.get_or_build_observed(spec, bound, tiling, &mut |_, _| {})
    }

    /// [`MapCache::get_or_build`], reporting the progress of a build as
    /// [`super::classify_observed`] does.
    pub fn get_or_build_observed(
        &self,
        spec: &Spec,
        bound: &Bound,
        tiling: Tiling,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Arc<BlockMaps>, MaskError> {
        let ids: Vec<usize> = spec.mask_buffers().iter().map(|b| b.0 as usize).collect();
        {
            let mut entries = self.lock();
            if let Some(i) = entries
                .iter()
                .position(|(k, _)| k.matches(bound, tiling, &ids))
            {
                let hit = entries.remove(i).expect("found above");
                let maps = hit.1.clone();
                entries.push_front(hit);
                return Ok(maps);
            }
        }
        // Built outside the lock: other calls go on meanwhile.
        let maps = Arc::new(classify_observed(spec, bound, tiling, progress)?);
        let bytes: usize = ids.iter().map(|&i| bound.buffers[i].size_bytes()).sum();
        if self.capacity > 0 && bytes <= MAX_CACHED_BUFFER_BYTES {
            let key = Key {
                tiling,
                shapes: bound.shapes,
                q_offset: bound.q_offset,
                kv_offset: bound.kv_offset,
                kv_rows: bound.kv_rows,
                kv_lens: bound.kv_lens.clone(),
                buffers: ids.iter().map(|&i| bound.buffers[i].clone()).collect(),
            };
            let mut entries = self.lock();
            entries.push_front((key, maps.clone()));
            entries.truncate(self.capacity);
        }
        Ok(maps)
    }
}
