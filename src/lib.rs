//! jetrelay: a Jetstream relay that lets the kernel do the fan-out.
pub mod config;
pub mod frame;
pub mod handshake;
pub mod proxy_protocol;
pub mod event;
pub mod subscription;
pub mod compress;
pub mod log;
pub mod index;
pub mod writer;
pub mod upstream;
pub mod fanout;
pub mod listener;
pub mod mock;
pub mod swarm;
pub mod tls;
pub mod relay;
