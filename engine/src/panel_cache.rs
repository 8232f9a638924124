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
//! File (format 2): `DVLPANEL`, the format (u32), 4 zero bytes, the manifest's offset and
//! length (u64 each; all little-endian), then from 4 KiB on each matrix's words (host order),
//! 4 KiB-aligned, then the manifest (JSON: format, identity, source, each matrix's
//! `[n, k, byte offset]`) at the end, written last. A file is used only when its identity
//! string equals the one computed for the checkpoint being loaded: the panel layout's
//! version, the host's byte order, a hash of `config.json` and, per shard, its name,
//! length, modification time and hashes of its first and last 64 KiB (the safetensors
//! header names every tensor's dtype, shape and offsets). A rewritten checkpoint gets a new
//! entry, and the entries written before for the same checkpoint directory (`source`) are
//! then deleted; a file that fails any check is reported and replaced.
//!
//! Writing ([`EntryWriter`]): the first load packs each matrix straight into its place in a
//! temporary file, mapped (blocks reserved first, so a full disk is an error, not a fault on
//! a mapped page), and keeps those pages as its panels: no anonymous copy, and the kernel
//! writes the pages back while packing goes on. The file is synced, then renamed over the
//! entry, so a reader never maps a half-written entry.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dvl_kernels::packed::{PackedBf16, SharedPanels, PANEL_LAYOUT_VERSION};

/// Version of the file format described above.
const FORMAT: u32 = 2;
const MAGIC: &[u8; 8] = b"DVLPANEL";
/// Bytes of the fixed header: magic, format, zeros, manifest offset, manifest length.
const HEADER: usize = 32;
/// Offsets of the matrices' words are multiples of this (the first is this).
const ALIGN: u64 = 4096;
/// A temporary file untouched for this long belongs to a writer that died: removed.
const ABANDONED: Duration = Duration::from_secs(3600);
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
    /// The checkpoint directory, as the manifest records it (entries of the same source
    /// with another identity are stale).
    source: String,
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
    /// The entry in `cache_dir` for the checkpoint in directory `checkpoint` made of
    /// `config_json` and `shards`.
    pub fn for_checkpoint(
        cache_dir: &Path,
        checkpoint: &Path,
        config_json: &[u8],
        shards: &[ShardId],
    ) -> PanelCache {
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
        let source = checkpoint
            .canonicalize()
            .unwrap_or_else(|_| checkpoint.to_path_buf())
            .to_string_lossy()
            .into_owned();
        PanelCache {
            path,
            identity,
            source,
        }
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
        let (manifest_at, manifest_len) = header(&map)?;
        let manifest: serde_json::Value = serde_json::from_slice(
            &map[manifest_at as usize..(manifest_at + manifest_len) as usize],
        )
        .map_err(|e| format!("manifest: {e}"))?;
        if manifest.get("format").and_then(|v| v.as_u64()) != Some(FORMAT as u64) {
            return Err(format!(
                "manifest of format {} (this build reads {FORMAT})",
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
            if offset % ALIGN != 0 || offset < ALIGN || end > manifest_at {
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

    /// A writer of this entry: a temporary file in the cache directory (created if
    /// missing) that [`EntryWriter::finish`] renames over the entry.
    pub fn writer(&self) -> std::io::Result<EntryWriter> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
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
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let w = EntryWriter {
            entry: self.clone(),
            file,
            tmp,
            matrices: Vec::new(),
            end: ALIGN,
            finished: false,
        };
        // The header stays zero (not ours) until `finish`.
        w.file.set_len(ALIGN)?;
        Ok(w)
    }

    /// Delete the entries of this entry's checkpoint directory written for another
    /// identity (the checkpoint or the panel layout changed since), and temporary files
    /// untouched for an hour (writers that died). Returns the files removed.
    pub fn remove_stale(&self) -> Vec<PathBuf> {
        let Some(dir) = self.path.parent() else {
            return Vec::new();
        };
        let Ok(listing) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for e in listing.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let stale = if name.starts_with('.') && name.contains(".dvlpanels.tmp-") {
                e.metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|age| age > ABANDONED)
            } else {
                name.ends_with(".dvlpanels")
                    && path != self.path
                    && source_of(&path).as_deref() == Some(self.source.as_str())
            };
            if stale && std::fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        }
        removed
    }
}

/// The manifest's place in a mapped file: `(offset, length)`, checked against the file.
fn header(map: &[u8]) -> Result<(u64, u64), String> {
    let len = map.len() as u64;
    if map.len() < HEADER || &map[..8] != MAGIC {
        return Err("not a dvl panel cache file".to_string());
    }
    let u64_at = |i: usize| u64::from_le_bytes(map[i..i + 8].try_into().expect("8 bytes"));
    let format = u32::from_le_bytes(map[8..12].try_into().expect("4 bytes"));
    if format != FORMAT {
        // Format 1 kept the manifest's length at 8 and the manifest itself at 16.
        return Err(if map[16] == b'{' {
            format!("written by an older dvl (cache file format 1; this build reads {FORMAT})")
        } else {
            format!("cache file format {format} (this build reads {FORMAT})")
        });
    }
    let (at, manifest_len) = (u64_at(16), u64_at(24));
    if manifest_len > MAX_MANIFEST || at < ALIGN || at.checked_add(manifest_len) != Some(len) {
        return Err(format!(
            "manifest of {manifest_len} bytes at {at} in a file of {len}"
        ));
    }
    Ok((at, manifest_len))
}

/// The `source` recorded in the cache file at `path`, if it is one of ours.
fn source_of(path: &Path) -> Option<String> {
    let mut file = File::open(path).ok()?;
    let mut head = [0u8; HEADER];
    std::io::Read::read_exact(&mut file, &mut head).ok()?;
    if &head[..8] != MAGIC || u32::from_le_bytes(head[8..12].try_into().ok()?) != FORMAT {
        return None;
    }
    let at = u64::from_le_bytes(head[16..24].try_into().ok()?);
    let len = u64::from_le_bytes(head[24..32].try_into().ok()?);
    if len > MAX_MANIFEST {
        return None;
    }
    file.seek(SeekFrom::Start(at)).ok()?;
    let mut manifest = vec![0u8; len as usize];
    std::io::Read::read_exact(&mut file, &mut manifest).ok()?;
    let doc: serde_json::Value = serde_json::from_slice(&manifest).ok()?;
    doc.get("source")?.as_str().map(str::to_owned)
}

/// A cache entry being written: matrices packed in place into a temporary file (see the
/// module's documentation). Dropped without [`EntryWriter::finish`], the file is removed
/// (panels handed out stay valid: their pages live as long as their maps).
pub struct EntryWriter {
    entry: PanelCache,
    file: File,
    tmp: PathBuf,
    /// `[n, k, offset]` of each matrix so far.
    matrices: Vec<(usize, usize, u64)>,
    /// End of the last matrix's words.
    end: u64,
    finished: bool,
}

impl EntryWriter {
    /// The next matrix, `n × k` in panels, written by `fill` into its place in the file and
    /// returned mapped from there.
    pub fn add(
        &mut self,
        n: usize,
        k: usize,
        fill: impl FnOnce(&mut [u32]),
    ) -> std::io::Result<PackedBf16> {
        let bytes = PackedBf16::checked_words(n as u64, k as u64)
            .and_then(|w| w.checked_mul(4))
            .ok_or_else(|| std::io::Error::other(format!("{n} x {k} panels overflow")))?;
        let offset = self.end.next_multiple_of(ALIGN);
        let end = offset + bytes;
        reserve(&self.file, offset, bytes)?;
        let panels = if bytes == 0 {
            let mut none = Vec::new();
            fill(&mut none);
            PackedBf16::from_panels(none, n, k)
        } else {
            // SAFETY: a map of our own temporary file, whose blocks were just reserved (no
            // fault on a full disk); no one else writes it (a fresh, unique name) and it is
            // never truncated while mapped.
            let mut map = unsafe {
                memmap2::MmapOptions::new()
                    .offset(offset)
                    .len(bytes as usize)
                    .map_mut(&self.file)
            }?;
            let words = bytemuck::try_cast_slice_mut::<u8, u32>(&mut map)
                .map_err(|e| std::io::Error::other(format!("mapped panels: {e}")))?;
            fill(words);
            let map = Arc::new(map.make_read_only()?);
            MappedWords::new(map, 0, bytes as usize)
                .and_then(|w| PackedBf16::from_shared(Arc::new(w), n, k))
        };
        let panels =
            panels.ok_or_else(|| std::io::Error::other(format!("{n} x {k}: panel size")))?;
        self.matrices.push((n, k, offset));
        self.end = end;
        Ok(panels)
    }

    /// Write the manifest and the header, sync, rename over the entry and remove the
    /// entry's stale files ([`PanelCache::remove_stale`]). Returns the entry's size and the
    /// stale files removed.
    pub fn finish(mut self) -> std::io::Result<(u64, Vec<PathBuf>)> {
        let entries: Vec<serde_json::Value> = self
            .matrices
            .iter()
            .map(|&(n, k, o)| serde_json::json!([n, k, o]))
            .collect();
        let doc = serde_json::json!({
            "format": FORMAT,
            "identity": self.entry.identity,
            "source": self.entry.source,
            "matrices": entries,
        });
        let manifest = serde_json::to_vec(&doc).map_err(std::io::Error::other)?;
        let at = self.end.max(ALIGN);
        self.file.seek(SeekFrom::Start(at))?;
        self.file.write_all(&manifest)?;
        let mut head = [0u8; HEADER];
        head[..8].copy_from_slice(MAGIC);
        head[8..12].copy_from_slice(&FORMAT.to_le_bytes());
        head[16..24].copy_from_slice(&at.to_le_bytes());
        head[24..32].copy_from_slice(&(manifest.len() as u64).to_le_bytes());
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(&head)?;
        // Also writes back the pages the matrices were packed into through their maps.
        self.file.sync_all()?;
        std::fs::rename(&self.tmp, &self.entry.path)?;
        self.finished = true;
        Ok((at + manifest.len() as u64, self.entry.remove_stale()))
    }
}

impl Drop for EntryWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Allocate the file's blocks for `len` bytes at `offset` (growing it), so that writing
/// them through a map cannot fail for want of space (which would be a SIGBUS, not an
/// error).
fn reserve(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let end = offset
        .checked_add(len)
        .ok_or_else(|| std::io::Error::other("file offset overflow"))?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(at), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(std::io::Error::other("file offset overflow"));
        };
        if len > 0 {
            // SAFETY: a plain system call on a descriptor we own; it reads no memory of ours.
            let err = unsafe { libc::posix_fallocate(file.as_raw_fd(), at, n) };
            if err != 0 {
                return Err(std::io::Error::from_raw_os_error(err));
            }
        }
        // posix_fallocate grows the file; set_len covers len 0.
        if file.metadata()?.len() < end {
            file.set_len(end)?;
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        // No portable reservation call: write the zeros (the file's blocks are then real).
        const ZEROS: [u8; 1 << 16] = [0; 1 << 16];
        let mut f = file;
        f.seek(SeekFrom::Start(offset))?;
        let mut at = offset;
        while at < end {
            let n = (end - at).min(ZEROS.len() as u64) as usize;
            f.write_all(&ZEROS[..n])?;
            at += n as u64;
        }
        Ok(())
    }
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
