//! The loop that drives the [`Machine`], apart from what it drives: look at
//! the world, step, perform, sleep until the next deadline. [`World`] is
//! everything outside (the channel, processes, the clock, sleeping); the
//! daemon's is real, a test's is a simulation on virtual time. Like the
//! machine, this module reads no clock and does no I/O of its own.
#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

use crate::machine::{Effect, Event, Machine, Millis};
use std::collections::VecDeque;

/// What the loop needs from outside.
pub trait World {
    /// The time now (ms since the epoch), the machine's only clock.
    fn now(&self) -> Millis;
    /// What happened since the last look (signals, exited children,
    /// background jobs, requests, what the SDK logged), oldest first.
    fn look(&mut self, machine: &Machine) -> Vec<Event>;
    /// Carries out one effect; its outcome, if it has one right away.
    fn perform(&mut self, effect: Effect) -> Option<Event>;
    /// Once the machine has exited: whether the loop may end (what could
    /// not be written yet has been, or will not be).
    fn may_end(&mut self) -> bool;
    /// Sleeps until something happens, `wake_at` (the machine's next
    /// timer) at the latest.
    fn sleep(&mut self, machine: &Machine, wake_at: Option<Millis>);
}

/// Feeds `event`, performs its effects in order and feeds their outcomes
/// back, first in first out, until nothing is left: the machine's calling
/// rule.
pub fn feed(machine: &mut Machine, world: &mut impl World, event: Event) {
    let mut queue = VecDeque::from([event]);
    while let Some(e) = queue.pop_front() {
        let now = world.now();
        for effect in machine.step(now, e) {
            queue.extend(world.perform(effect));
        }
    }
}

/// Performs effects the machine made outside a step (at start), feeding
/// their outcomes back.
pub fn perform_all(machine: &mut Machine, world: &mut impl World, effects: Vec<Effect>) {
    for effect in effects {
        if let Some(outcome) = world.perform(effect) {
            feed(machine, world, outcome);
        }
    }
}

/// One pass: what the world saw, then the timers that are due.
pub fn pass(machine: &mut Machine, world: &mut impl World) {
    for event in world.look(machine) {
        feed(machine, world, event);
    }
    for timer in machine.due_timers(world.now()) {
        feed(machine, world, Event::Timeout(timer));
    }
}

/// Runs passes until the machine has exited and the world may end,
/// sleeping between them until the machine's next timer at the latest.
pub fn run(machine: &mut Machine, world: &mut impl World) {
    loop {
        pass(machine, world);
        if machine.has_exited() && world.may_end() {
            return;
        }
        let wake_at = machine.next_timer().map(|(at, _)| at);
        world.sleep(machine, wake_at);
    }
}
