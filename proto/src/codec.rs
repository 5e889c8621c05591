//! The gRPC codec of every corral service: prost, with small initial buffers.
//!
//! tonic allocates an encode and a decode buffer per RPC up front (8 KiB each by default) and keeps them for the
//! life of a stream. A master holds one long-lived stream per agent and per framework, so at 10,000 agents the
//! default buffers alone cost 160 MiB. Ours start at 1 KiB and grow (by doubling) only for large messages.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial buffer per RPC and direction; most corral messages are a few hundred bytes.
const BUFFER_SIZE: usize = 1024;
/// How much a server stream batches into one write when messages are ready back to back (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// A prost codec with [`BUFFER_SIZE`] buffers; named by the generated code (see `build.rs`).
#[derive(Debug, Clone, Copy)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}
