//! A persistent worker pool: `n - 1` worker threads plus the caller split each operation into
//! tasks taken from an atomic counter (dynamic chunking). Workers spin briefly between
//! operations (decode issues hundreds of matmuls per token, so waking a parked thread each time
//! would cost more than the work), then park on a condition variable when idle.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    generation: AtomicU64,
    job: UnsafeCell<Option<Job>>,
    next_task: AtomicUsize,
    n_tasks: AtomicUsize,
    finished_workers: AtomicUsize,
    /// Workers blocked on the condition variable (the caller notifies only when there are some).
    parked: AtomicUsize,
    /// Whether a task of the current operation panicked on a worker (the caller re-raises it).
    worker_panicked: AtomicBool,
    shutdown: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread that owns the pool while no worker reads it (all
// workers have reported `finished_workers` for the previous generation), and read by workers only
// after they observe the new generation with Acquire ordering, which the writer published with
// Release ordering after writing `job`.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw job pointer is only dereferenced while the caller of `run` keeps the
// closure alive (it waits for every worker before returning).
unsafe impl Send for Shared {}

/// A fixed set of worker threads that run data-parallel operations.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    busy: AtomicBool,
}

/// Spins (about 20–50 µs) before a worker parks: long enough to bridge the serial gaps between
/// the matmuls of one decode step, short enough not to starve other threads when the machine is
/// oversubscribed.
const SPIN_ITERS: u32 = 50_000;

/// Spins before the caller, waiting for workers to finish, starts yielding its time slice.
const CALLER_SPIN_ITERS: u32 = 20_000;

impl ThreadPool {
    /// A pool that runs operations on `n_threads` threads in all (the caller counts as one).
    pub fn new(n_threads: usize) -> ThreadPool {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            next_task: AtomicUsize::new(0),
            n_tasks: AtomicUsize::new(0),
            finished_workers: AtomicUsize::new(0),
            worker_panicked: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..n_threads)
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("ruvllm-worker-{i}"))
                    .spawn(move || worker_loop(&s))
                    .unwrap_or_else(|e| panic!("cannot spawn worker thread: {e}"))
            })
            .collect();
        ThreadPool {
            shared,
            workers,
            busy: AtomicBool::new(false),
        }
    }

    /// Threads in the pool, the caller included.
    pub fn n_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(0..n_tasks)` across the pool and returns when every task has finished.
    /// Re-entrant or concurrent calls run serially on the calling thread.
    ///
    /// # Panics
    /// If a task panics, after every thread has stopped working on the operation (the other
    /// tasks may or may not have run); the pool stays usable. Without the wait, a caller
    /// unwinding out of here would free the closure a worker may still be running (and a worker
    /// that died would leave the next caller waiting for it forever).
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        if self.workers.is_empty() || n_tasks == 1 || self.busy.swap(true, Ordering::Acquire) {
            (0..n_tasks).for_each(f);
            return;
        }
        let s = &*self.shared;
        // SAFETY: only this thread writes `job`, and only while `busy` is held and every worker has
        // finished the previous generation (checked at the end of the previous `run`). The pointer
        // is erased to 'static, but no worker dereferences it after `finished_workers` reaches the
        // worker count, which this function waits for before returning.
        unsafe {
            let job: Job =
                std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(f);
            *s.job.get() = Some(job);
        }
        s.next_task.store(0, Ordering::Relaxed);
        s.n_tasks.store(n_tasks, Ordering::Relaxed);
        s.finished_workers.store(0, Ordering::Relaxed);
        s.generation.fetch_add(1, Ordering::SeqCst);
        // A worker parks only after registering in `parked` and re-checking the generation under
        // the lock (SeqCst on both sides), so either it sees the new generation or we see it.
        if s.parked.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
            s.wake.notify_all();
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_tasks(s, f)));
        let n_workers = self.workers.len();
        let mut spins = 0u32;
        while s.finished_workers.load(Ordering::Acquire) < n_workers {
            spins += 1;
            if spins < CALLER_SPIN_ITERS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        self.busy.store(false, Ordering::Release);
        let worker_panicked = s.worker_panicked.swap(false, Ordering::AcqRel);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if worker_panicked {
            panic!("a thread-pool task panicked on a worker thread");
        }
    }
}

fn run_tasks(s: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let n = s.n_tasks.load(Ordering::Relaxed);
    loop {
        let t = s.next_task.fetch_add(1, Ordering::Relaxed);
        if t >= n {
            break;
        }
        f(t);
    }
}

fn worker_loop(s: &Shared) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        let gen = loop {
            let g = s.generation.load(Ordering::Acquire);
            if g != seen || s.shutdown.load(Ordering::Acquire) {
                break g;
            }
            spins += 1;
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
            } else {
                let guard = s.lock.lock().unwrap_or_else(|p| p.into_inner());
                s.parked.fetch_add(1, Ordering::SeqCst);
                if s.generation.load(Ordering::SeqCst) == seen
                    && !s.shutdown.load(Ordering::Acquire)
                {
                    drop(s.wake.wait(guard).unwrap_or_else(|p| p.into_inner()));
                } else {
                    drop(guard);
                }
                s.parked.fetch_sub(1, Ordering::SeqCst);
                spins = 0;
            }
        };
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        seen = gen;
        // SAFETY: the generation was published after `job` was written (Release/Acquire), and the
        // owner keeps the closure alive until this worker increments `finished_workers`.
        if let Some(job) = unsafe { *s.job.get() } {
            let f = unsafe { &*job };
            // A panicking task ends this worker's part of the operation, not the worker: the
            // caller learns of it and re-raises it once every thread is done.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_tasks(s, f)));
            if ran.is_err() {
                s.worker_panicked.store(true, Ordering::Release);
            }
        }
        s.finished_workers.fetch_add(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_exactly_once_across_many_operations() {
        let pool = ThreadPool::new(3);
        for n in [0usize, 1, 2, 7, 100] {
            for _ in 0..50 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(n, &|t| {
                    hits[t].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    /// A panicking task reaches the caller as a panic once every thread is done (not a hang,
    /// not a worker lost), whichever thread ran it; the pool then runs operations as before.
    #[test]
    fn a_panicking_task_panics_the_caller_and_the_pool_goes_on() {
        let pool = ThreadPool::new(2);
        for panicking in [vec![5usize], (0..64).collect::<Vec<_>>()] {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.run(64, &|t| {
                    if panicking.contains(&t) {
                        panic!("task {t}");
                    }
                });
            }));
            assert!(r.is_err());
            let hits: Vec<AtomicUsize> = (0..100).map(|_| AtomicUsize::new(0)).collect();
            let threads = Mutex::new(std::collections::HashSet::new());
            pool.run(100, &|t| {
                hits[t].fetch_add(1, Ordering::Relaxed);
                threads.lock().unwrap().insert(std::thread::current().id());
                std::thread::sleep(std::time::Duration::from_micros(200));
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            // Both threads still take tasks (the worker survived; `busy` was released).
            assert_eq!(threads.lock().unwrap().len(), 2);
        }
    }

    #[test]
    fn nested_run_falls_back_to_serial() {
        let pool = ThreadPool::new(2);
        let total = AtomicUsize::new(0);
        pool.run(4, &|_| {
            pool.run(3, &|_| {
                total.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(total.load(Ordering::Relaxed), 12);
    }
}
