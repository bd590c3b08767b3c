//! The second scoring thread: started once, kept for the life of the process, so splitting a
//! scoring call over both cores costs a hand-off, not a thread spawn.
//!
//! A one-thread rayon pool: [`join`] hands one half of the work to it and runs the other half on
//! the calling thread (`in_place_scope`), so a scoring call uses exactly two threads, the
//! caller's and this one. Concurrent callers queue on the one helper (each still runs its own
//! half), and on a one-core machine both halves run on the caller.

use std::sync::OnceLock;

fn helper() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores < 2 {
            return None;
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "fraudstream-score".into())
            .build()
            .ok()
    })
    .as_ref()
}

/// Runs `a` on this thread and `b` on the scoring helper at the same time (both here when there
/// is no second core), and returns both results. A panic in either is propagated.
pub(crate) fn join<A, B>(a: impl FnOnce() -> A, b: impl FnOnce() -> B + Send) -> (A, B)
where
    B: Send,
{
    let Some(pool) = helper() else {
        return (a(), b());
    };
    let mut rb = None;
    let ra = pool.in_place_scope(|scope| {
        scope.spawn(|_| rb = Some(b()));
        a()
    });
    (ra, rb.expect("the helper's half ran"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_halves_run_and_return_their_results() {
        let data: Vec<u64> = (0..1000).collect();
        for _ in 0..100 {
            let (x, y) = join(
                || data[..500].iter().sum::<u64>(),
                || data[500..].iter().sum::<u64>(),
            );
            assert_eq!(x + y, 499_500);
        }
    }

    #[test]
    fn concurrent_callers_each_get_their_own_results() {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                std::thread::spawn(move || {
                    (0..200)
                        .map(|i| {
                            let (a, b) = join(|| t * 1000 + i, || t * 1000 + i + 1);
                            assert_eq!(b, a + 1);
                            a
                        })
                        .count()
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 200);
        }
    }
}
