//! Lock helpers that keep serving after a panic elsewhere.
//!
//! Owns `read`, `write` and `lock`: the crate's locks guard plain data that every writer leaves
//! consistent, so a poisoned lock only means another thread panicked while holding it, and the
//! data path goes on with the value inside instead of panicking too.
//!
//! Must not touch: anything but the lock it is given.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
