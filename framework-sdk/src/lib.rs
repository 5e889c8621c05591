//! corral-sdk: write a corral framework (a scheduler) in a few lines.
//!
//! Implement [`Scheduler`], then run it with [`SchedulerDriver`]. The driver subscribes to the master, re-subscribes
//! with the same framework id after any disconnect (following the master list), watches heartbeats, reconciles
//! after each (re-)subscription, and acknowledges every status update **after** your callback returns — so an
//! update is only acknowledged once you have seen it.
//!
//! ```no_run
//! use corral_sdk::{Driver, Masters, Scheduler, SchedulerDriver, TaskBuilder, OfferPool, v1};
//! use corral_sdk::Resources;
//!
//! struct Hello { launched: bool }
//!
//! #[corral_sdk::async_trait]
//! impl Scheduler for Hello {
//!     async fn offers(&mut self, driver: &Driver, offers: Vec<v1::Offer>) {
//!         for offer in offers {
//!             let mut pool = OfferPool::new(&offer).expect("valid offer");
//!             let need = Resources::parse("cpus:0.1;mem:32").unwrap();
//!             match pool.take(&need, 0) {
//!                 Some(res) if !self.launched => {
//!                     self.launched = true;
//!                     let task = TaskBuilder::new("hello-1").shell("echo hello").resources(&res).build();
//!                     let _ = driver.launch(&offer, vec![task]).await;
//!                 }
//!                 _ => { let _ = driver.decline([&offer.id], Some(60.0)).await; }
//!             }
//!         }
//!     }
//!     async fn status_update(&mut self, driver: &Driver, status: &v1::TaskStatus) {
//!         if corral_sdk::is_terminal(status) { driver.stop(); }
//!     }
//! }
//!
//! # async fn run() -> Result<(), corral_sdk::DriverError> {
//! let framework = v1::FrameworkInfo { name: "hello".into(), ..Default::default() };
//! // Any of "m1:5050,m2:5050,m3:5050" or "etcd://e1:2379,e2:2379" finds the leading master.
//! let masters = Masters::parse("127.0.0.1:5050").expect("a valid master list");
//! SchedulerDriver::new(masters, framework).run(Hello { launched: false }).await
//! # }
//! ```

mod driver;
mod offers;

pub use async_trait::async_trait;
pub use corral_discovery::Masters;
pub use corral_proto::v1;
pub use corral_proto::{Resources, v1::TaskState};
pub use driver::{Driver, DriverError, SchedulerDriver};
pub use offers::{OfferPool, TaskBuilder, ops};

/// Callbacks a framework implements. Every method has a default that does nothing (offers are declined by
/// default, so an idle framework never hoards resources).
#[async_trait]
pub trait Scheduler: Send {
    /// Subscribed (or re-subscribed after a disconnect, with the same id).
    async fn registered(&mut self, _driver: &Driver, _framework_id: &str, _master: &str) {}
    /// Resources offered to this framework. Accept (launch) or decline each one.
    async fn offers(&mut self, driver: &Driver, offers: Vec<v1::Offer>) {
        let ids: Vec<String> = offers.into_iter().map(|o| o.id).collect();
        let _ = driver.decline(&ids, None).await;
    }
    /// An offer was withdrawn; launching on it now fails with TASK_DROPPED.
    async fn rescinded(&mut self, _driver: &Driver, _offer_id: &str) {}
    /// A task changed state. Acknowledged by the driver when this returns.
    async fn status_update(&mut self, _driver: &Driver, _status: &v1::TaskStatus) {}
    /// The master reported an error about this framework (e.g. it was torn down).
    async fn error(&mut self, _driver: &Driver, _message: &str) {}
    /// The connection to the master dropped; the driver is reconnecting (to a new leader after a failover).
    /// Offers received so far are void: the master that made them is gone or no longer leads. Tasks whose launch was
    /// in flight may or may not have started; after `registered`, ask with [`Driver::reconcile`] (a master answers
    /// for tasks on agents still re-registering only once they are back).
    async fn disconnected(&mut self, _driver: &Driver) {}
}

/// Whether a status is terminal (the task will not change again).
pub fn is_terminal(status: &v1::TaskStatus) -> bool {
    state_of(status).is_terminal()
}

/// The state of a status as the enum.
pub fn state_of(status: &v1::TaskStatus) -> TaskState {
    TaskState::try_from(status.state).unwrap_or(TaskState::TaskUnknown)
}
