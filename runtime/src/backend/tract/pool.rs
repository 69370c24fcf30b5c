//! The threads one inference runs on. tract splits its matrix products, depthwise convolutions
//! and element-wise operators across the pool the call runs in, and runs everything on the
//! calling thread without one. The pool is sized like ONNX Runtime's intra-op pool, by
//! `SessionOptions::intra_op_threads` (every CPU this process may use when unset), and the same
//! rule chooses between it and one thread at load ([`crate::threads`]). A build without the
//! `tract-pool` feature has no pool: every call runs on the caller's thread.

#[cfg(not(feature = "tract-pool"))]
pub(crate) use self::caller::Pool;
#[cfg(feature = "tract-pool")]
pub(crate) use self::threads::Pool;

/// Whether this build splits a call across threads.
pub(crate) const BUILT: bool = cfg!(feature = "tract-pool");

#[cfg(feature = "tract-pool")]
mod threads {
    use std::sync::Arc;

    use tract_onnx::prelude::multithread::{Executor, multithread_tract_scope};

    /// A session's threads: none beyond the caller's, or a pool of its own.
    #[derive(Debug)]
    pub(crate) struct Pool {
        executor: Executor,
    }

    impl Pool {
        /// A pool of `threads` (the caller's thread alone for one). Starting the threads can fail
        /// (the process's thread limit); that is an error at load.
        pub(crate) fn new(threads: usize) -> Result<Pool, String> {
            if threads <= 1 {
                return Ok(Pool { executor: Executor::SingleThread });
            }
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("tract-pool-{i}"))
                .build()
                .map_err(|e| format!("could not start a pool of {threads} threads for one inference: {e}"))?;
            Ok(Pool { executor: Executor::MultiThread(Arc::new(pool)) })
        }

        /// Runs `f` (a plan's call) with tract's operators splitting their work across the pool.
        /// The whole call runs on one of the pool's threads, so that each operator's split runs
        /// there and on the pool's other threads, and the caller's thread waits once per call
        /// rather than once per operator.
        pub(crate) fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
            match &self.executor {
                Executor::MultiThread(pool) => pool.install(|| multithread_tract_scope(self.executor.clone(), f)),
                _ => f(),
            }
        }
    }
}

#[cfg(not(feature = "tract-pool"))]
mod caller {
    /// The caller's thread, whatever the count asked for.
    #[derive(Debug)]
    pub(crate) struct Pool;

    impl Pool {
        pub(crate) fn new(_threads: usize) -> Result<Pool, String> {
            Ok(Pool)
        }

        pub(crate) fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
            f()
        }
    }
}

#[cfg(test)]
#[cfg(feature = "tract-pool")]
mod tests {
    use tract_onnx::prelude::multithread::Executor;

    use super::*;

    fn thread_name() -> Option<String> {
        std::thread::current().name().map(String::from)
    }

    #[test]
    fn a_call_runs_on_the_pool_or_on_the_caller() {
        let caller = thread_name();
        assert_eq!(Pool::new(1).unwrap().run(thread_name), caller);
        let pool = Pool::new(2).unwrap();
        let on = pool.run(thread_name).unwrap_or_default();
        assert!(on.starts_with("tract-pool-"), "{on}");
        // tract's operators see the pool as the executor for the whole call.
        let executor = pool.run(tract_onnx::prelude::multithread::current_tract_executor);
        assert!(matches!(executor, Executor::MultiThread(p) if p.current_num_threads() == 2));
        assert!(matches!(
            Pool::new(1).unwrap().run(tract_onnx::prelude::multithread::current_tract_executor),
            Executor::SingleThread
        ));
    }
}
