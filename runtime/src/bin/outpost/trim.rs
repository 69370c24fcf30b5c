//! Giving the code that only loading runs back to the kernel.
//!
//! Loading a model runs tract's ONNX import, its optimiser and the golden check: most of the
//! binary's code, once. The kernel keeps mapped what those runs faulted in (and 64 KB around each
//! page touched), so once the models are ready about 14 MB of the executable count in the
//! process's resident set and its cgroup's memory, until memory pressure reclaims them. After
//! the models are loaded, [`release_executable_pages`] asks the kernel to reclaim them now
//! (`MADV_PAGEOUT`, Linux 5.4 and later). They are clean file pages: the ones the request path
//! uses fault back in on the next requests (from the page cache, or the disk where the kernel
//! already dropped them); the rest stay out until a model loads again. The daemon does this once,
//! when its models are ready at start; the pages an update's load brings back stay until memory
//! pressure takes them. Best effort: an older kernel refuses the advice and nothing changes.

use std::path::Path;

/// The executable's read-only and executable mappings (never a writable one: its touched pages
/// are the process's own copies), as `(start, length)`.
fn executable_mappings(maps: &str, exe: &Path) -> Vec<(usize, usize)> {
    let exe = exe.to_string_lossy();
    maps.lines()
        .filter_map(|line| {
            // start-end perms offset dev inode path
            let mut fields = line.splitn(6, ' ');
            let range = fields.next()?;
            let perms = fields.next()?;
            let path = fields.nth(3)?.trim_start();
            let path = path.strip_suffix(" (deleted)").unwrap_or(path);
            if path != exe || perms.as_bytes().get(1) != Some(&b'-') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            Some((start, end.checked_sub(start)?))
        })
        .collect()
}

/// Advises the kernel to page out the executable's clean mappings; returns the bytes advised.
pub fn release_executable_pages() -> std::io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut advised = 0;
    for (start, len) in executable_mappings(&maps, &exe) {
        // SAFETY: MADV_PAGEOUT over a private, read-only file mapping of this executable only
        // reclaims clean page-cache pages; the contents seen through the mapping never change.
        let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_PAGEOUT) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        advised += len;
    }
    Ok(advised)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_executables_unwritable_mappings() {
        let maps = "\
5600a000-5600b000 r--p 00000000 08:01 42 /usr/bin/outpost
5600b000-5600f000 r-xp 00001000 08:01 42 /usr/bin/outpost
5600f000-56010000 rw-p 00005000 08:01 42 /usr/bin/outpost
56010000-56011000 rw-p 00000000 00:00 0 [heap]
7f000000-7f001000 r-xp 00000000 08:01 7 /usr/lib/libc.so
7f002000-7f003000 r-xp 00000000 08:01 42                    /usr/bin/outpost (deleted)
";
        assert_eq!(
            executable_mappings(maps, Path::new("/usr/bin/outpost")),
            vec![(0x5600a000, 0x1000), (0x5600b000, 0x4000), (0x7f002000, 0x1000)]
        );
    }

    #[test]
    fn this_process_has_its_code_advised() {
        // Linux 5.4+ on the test machine; the figure is the mappings' size, not what was reclaimed.
        let advised = release_executable_pages().expect("MADV_PAGEOUT over this test binary");
        assert!(advised > 0, "the test binary's own code was found in /proc/self/maps");
    }
}
