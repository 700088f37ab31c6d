//! Pure protocol logic: bytes in, bytes and events out. Nothing here touches
//! a socket, a clock or a thread; time arrives as an argument.

pub mod body;
pub mod channel;
pub mod compression;
pub mod pusher;
pub mod wire;
pub mod ws;
