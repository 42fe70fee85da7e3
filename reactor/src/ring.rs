//! The bounded multi-producer ring that carries messages between reactors.
//!
//! It wraps `crossbeam_queue::ArrayQueue` so that the protocols built on it can
//! be model-checked: under `--cfg loom` the same type is a loom-instrumented
//! mutex around a deque (loom cannot see crossbeam's own atomics).

#[cfg(not(loom))]
mod imp {
    use crossbeam_queue::ArrayQueue;

    /// A bounded FIFO; `push` fails (returning the value) when full.
    pub struct Ring<T> {
        q: ArrayQueue<T>,
    }

    impl<T> Ring<T> {
        pub fn new(capacity: usize) -> Self {
            Ring { q: ArrayQueue::new(capacity.max(1)) }
        }
        pub fn push(&self, v: T) -> Result<(), T> {
            self.q.push(v)
        }
        pub fn pop(&self) -> Option<T> {
            self.q.pop()
        }
        pub fn len(&self) -> usize {
            self.q.len()
        }
        pub fn is_empty(&self) -> bool {
            self.q.is_empty()
        }
        pub fn capacity(&self) -> usize {
            self.q.capacity()
        }
    }
}

#[cfg(loom)]
mod imp {
    use loom::sync::Mutex;
    use std::collections::VecDeque;

    /// Loom twin of the ring: same contract, instrumented synchronisation.
    pub struct Ring<T> {
        q: Mutex<VecDeque<T>>,
        capacity: usize,
    }

    impl<T> Ring<T> {
        pub fn new(capacity: usize) -> Self {
            Ring { q: Mutex::new(VecDeque::new()), capacity: capacity.max(1) }
        }
        pub fn push(&self, v: T) -> Result<(), T> {
            let mut q = self.q.lock().unwrap();
            if q.len() >= self.capacity {
                return Err(v);
            }
            q.push_back(v);
            Ok(())
        }
        pub fn pop(&self) -> Option<T> {
            self.q.lock().unwrap().pop_front()
        }
        pub fn len(&self) -> usize {
            self.q.lock().unwrap().len()
        }
        pub fn is_empty(&self) -> bool {
            self.len() == 0
        }
        pub fn capacity(&self) -> usize {
            self.capacity
        }
    }
}

pub use imp::Ring;

#[cfg(all(test, not(loom)))]
mod tests {
    use super::Ring;

    #[test]
    fn bounded_fifo() {
        let r = Ring::new(3);
        assert!(r.push(1).is_ok());
        assert!(r.push(2).is_ok());
        assert!(r.push(3).is_ok());
        assert_eq!(r.push(4), Err(4));
        assert_eq!(r.len(), 3);
        assert_eq!(r.pop(), Some(1));
        assert_eq!(r.pop(), Some(2));
        assert_eq!(r.pop(), Some(3));
        assert_eq!(r.pop(), None);
        assert!(r.is_empty());
    }
}
