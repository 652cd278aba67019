//! C heap tuning for a small resident set: on glibc, every thread shares one malloc arena.
//!
//! librdkafka allocates each fetched record batch (decompressed) and one operation per record in
//! its broker thread, and the partition threads free them. glibc gives up to eight arenas per core,
//! each keeping its own freed memory, so the same traffic leaves several MiB more resident than one
//! shared arena does. The worker's threads spend little time in malloc, so sharing costs nothing
//! measurable. An operator's own `MALLOC_ARENA_MAX` is left in force.

/// Limits glibc to one malloc arena unless `MALLOC_ARENA_MAX` is set. Call it first in `main`,
/// before any other thread starts.
pub fn use_one_arena() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a malloc tunable; it is called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
