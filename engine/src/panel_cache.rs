//! The on-disk panel cache: the text decoder's panels ([`dvl_kernels::packed`]) written
//! once per checkpoint, mapped by later loads instead of repacked.
//!
//! Why: repacking is a pass over every text weight plus a fresh copy the kernel has to zero
//! page by page: 7-28 s for the 3B shape on a 2-core machine, on every start. A mapped
//! cache file costs a map and a header check; its pages are the page cache's (shared between
//! processes, dropped and re-read under memory pressure instead of held as anonymous
//! memory).
//!
//! Opt-in (a directory, [`crate::engine::LoadOptions::panel_cache`] or `DVL_PANEL_CACHE`):
//! it takes the panels' size again on disk.
//!
//! File: `DVLPANEL`, the manifest's length (u64, little-endian), the manifest (JSON: format,
//! identity, each matrix's `[n, k, byte offset]`), then each matrix's words (host order) at
//! its offset, 4 KiB-aligned. A file is used only when its identity string equals the one
//! computed for the checkpoint being loaded: the panel layout's version, the host's byte
//! order, a hash of `config.json` and, per shard, its name, length, modification time and
//! hashes of its first and last 64 KiB (the safetensors header names every tensor's dtype,
//! shape and offsets). A rewritten checkpoint gets a new entry; a file that fails any check
//! is reported and replaced. Files are written under a temporary name, synced, then renamed,
//! so a reader never maps a half-written entry.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dvl_kernels::packed::{PackedBf16, SharedPanels, PANEL_LAYOUT_VERSION};

/// Version of the file format described above.
const FORMAT: u64 = 1;
const MAGIC: &[u8; 8] = b"DVLPANEL";
/// Offsets of the matrices' words are multiples of this.
const ALIGN: u64 = 4096;
/// Bytes at each end of a shard that its identity hashes.
const SAMPLE: usize = 64 * 1024;
/// A manifest longer than this is not one of ours.
const MAX_MANIFEST: u64 = 64 << 20;

/// FNV-1a, 64-bit: a stable hash for identities and file names (std's hasher may change
/// between Rust releases; a cache must not).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// One checkpoint's entry in a cache directory.
#[derive(Clone, Debug)]
pub struct PanelCache {
    path: PathBuf,
    identity: String,
}

/// What a checkpoint shard contributes to a cache entry's identity.
#[derive(Clone, Debug)]
pub struct ShardId(String);

impl ShardId {
    /// The shard at `path`, mapped as `bytes`: its name, length, modification time and the
    /// hashes of its first and last 64 KiB. `None` where the modification time cannot be
    /// read (the identity would be too weak to trust).
    pub fn of(path: &Path, bytes: &[u8]) -> Option<ShardId> {
        let mtime = std::fs::metadata(path)
            .ok()?
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_nanos();
        let name = path.file_name()?.to_string_lossy();
        Some(ShardId(format!(
            "shard {name} {} bytes, modified {mtime} ns, head {:016x}, tail {:016x}",
            bytes.len(),
            fnv1a(&bytes[..bytes.len().min(SAMPLE)]),
            fnv1a(&bytes[bytes.len().saturating_sub(SAMPLE)..])
        )))
    }
}

impl PanelCache {
    /// The entry for the checkpoint of `config_json` and `shards` in `cache_dir`.
    pub fn for_checkpoint(cache_dir: &Path, config_json: &[u8], shards: &[ShardId]) -> PanelCache {
        let mut identity = format!(
            "dvl panel cache {FORMAT}; panel layout {PANEL_LAYOUT_VERSION}; {}-endian; \
             config {:016x}",
            if cfg!(target_endian = "little") {
                "little"
            } else {
                "big"
            },
            fnv1a(config_json)
        );
        for s in shards {
            identity.push_str("; ");
            identity.push_str(&s.0);
        }
        let path = cache_dir.join(format!("{:016x}.dvlpanels", fnv1a(identity.as_bytes())));
        PanelCache { path, identity }
    }

    /// The entry's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cached matrices in pack order, mapped: `Ok(None)` when there is no entry,
    /// `Err(why)` when the file is there but unusable (not ours, truncated, another format
    /// or another checkpoint's). Whether they are the shapes the model packs is the
    /// caller's to check ([`PackedBf16::n`], [`PackedBf16::k`]).
    pub fn load(&self) -> Result<Option<Vec<PackedBf16>>, String> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            // No entry (or no directory: the write that follows says so).
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e.to_string()),
        };
        // SAFETY: read-only map of a file that is only ever replaced by rename, never
        // written in place (see `store`); modifying it by other means while loaded is
        // outside what a loader can defend against (the checkpoint's contract too).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| e.to_string())?;
        let len = map.len() as u64;
        if len < 16 || &map[..8] != MAGIC {
            return Err("not a dvl panel cache file".to_string());
        }
        let manifest_len = u64::from_le_bytes(map[8..16].try_into().expect("8 bytes"));
        if manifest_len > MAX_MANIFEST || 16 + manifest_len > len {
            return Err(format!(
                "manifest of {manifest_len} bytes in a file of {len}"
            ));
        }
        let manifest: serde_json::Value =
            serde_json::from_slice(&map[16..16 + manifest_len as usize])
                .map_err(|e| format!("manifest: {e}"))?;
        if manifest.get("format").and_then(|v| v.as_u64()) != Some(FORMAT) {
            return Err(format!(
                "format {} (this build reads {FORMAT})",
                manifest["format"]
            ));
        }
        if manifest.get("identity").and_then(|v| v.as_str()) != Some(self.identity.as_str()) {
            return Err("written for another checkpoint or build (identity differs)".to_string());
        }
        let entries = manifest
            .get("matrices")
            .and_then(|v| v.as_array())
            .ok_or("manifest without matrices")?;
        let map = Arc::new(map);
        let mut out = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            let field = |j: usize| e.get(j).and_then(|v| v.as_u64());
            let (Some(n), Some(k), Some(offset)) = (field(0), field(1), field(2)) else {
                return Err(format!("matrix {i}: entry is not [n, k, offset]"));
            };
            // Bytes of n × k in panels, without overflow for absurd entries.
            let bytes = PackedBf16::checked_words(n, k).and_then(|w| w.checked_mul(4));
            let end = bytes.and_then(|b| offset.checked_add(b));
            let (Some(bytes), Some(end)) = (bytes, end) else {
                return Err(format!("matrix {i}: {n} x {k} at {offset} is out of range"));
            };
            if offset % ALIGN != 0 || offset < 16 + manifest_len || end > len {
                return Err(format!(
                    "matrix {i}: {n} x {k} ({bytes} bytes) at {offset} does not fit the \
                     file ({len} bytes)"
                ));
            }
            let words = MappedWords::new(map.clone(), offset as usize, bytes as usize)
                .ok_or_else(|| format!("matrix {i}: misaligned"))?;
            let shared: SharedPanels = Arc::new(words);
            let m = PackedBf16::from_shared(shared, n as usize, k as usize)
                .ok_or_else(|| format!("matrix {i}: {n} x {k} does not match its bytes"))?;
            out.push(m);
        }
        Ok(Some(out))
    }

    /// Write `matrices` (in pack order) as this entry: a temporary file in the directory
    /// (created if missing), synced, then renamed over the entry. Returns the bytes written.
    pub fn store(&self, matrices: &[&PackedBf16]) -> std::io::Result<u64> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        // The data starts after the manifest, whose length depends on the offsets: grow
        // the room for it until it fits.
        let mut data_start = ALIGN;
        let (manifest, offsets) = loop {
            let mut offsets = Vec::with_capacity(matrices.len());
            let mut offset = data_start;
            for m in matrices {
                offsets.push(offset);
                offset = (offset + m.bytes() as u64).next_multiple_of(ALIGN);
            }
            let entries: Vec<serde_json::Value> = matrices
                .iter()
                .zip(&offsets)
                .map(|(m, o)| serde_json::json!([m.n(), m.k(), o]))
                .collect();
            let doc = serde_json::json!({
                "format": FORMAT,
                "identity": self.identity,
                "matrices": entries,
            });
            let manifest = serde_json::to_vec(&doc).map_err(std::io::Error::other)?;
            if 16 + manifest.len() as u64 <= data_start {
                break (manifest, offsets);
            }
            data_start = (16 + manifest.len() as u64).next_multiple_of(ALIGN);
        };
        // A name no other writer uses, in this process or another: two loads of the same
        // checkpoint at once each write their own file, and the later rename wins.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{}",
            self.path
                .file_name()
                .map_or("".into(), |n| n.to_string_lossy()),
            std::process::id(),
            WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let result = (|| {
            let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
            w.write_all(MAGIC)?;
            w.write_all(&(manifest.len() as u64).to_le_bytes())?;
            w.write_all(&manifest)?;
            let mut at = 16 + manifest.len() as u64;
            for (m, &offset) in matrices.iter().zip(&offsets) {
                pad(&mut w, offset - at)?;
                w.write_all(bytemuck::cast_slice(m.as_words()))?;
                at = offset + m.bytes() as u64;
            }
            let file = w.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            Ok(at)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

fn pad(w: &mut impl Write, mut n: u64) -> std::io::Result<()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        w.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// One matrix's words inside a mapped cache file (which it keeps mapped).
struct MappedWords {
    map: Arc<memmap2::Mmap>,
    start: usize,
    bytes: usize,
}

impl MappedWords {
    /// `None` unless the range is inside the map and 4-byte aligned.
    fn new(map: Arc<memmap2::Mmap>, start: usize, bytes: usize) -> Option<Self> {
        let range = map.get(start..start.checked_add(bytes)?)?;
        bytemuck::try_cast_slice::<u8, u32>(range).ok()?;
        Some(MappedWords { map, start, bytes })
    }
}

impl AsRef<[u32]> for MappedWords {
    fn as_ref(&self) -> &[u32] {
        // In range and aligned: checked in `new`, and a map does not move.
        bytemuck::cast_slice(&self.map[self.start..self.start + self.bytes])
    }
}

#[cfg(test)]
mod tests {
    use super::fnv1a;

    #[test]
    fn fnv1a_is_the_published_function() {
        // Test vectors of FNV-1a 64 (Fowler, Noll, Vo).
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
