//! The [`Communicator`](super::Communicator)'s WebSocket client over the
//! in-memory pipe: frames are parsed and formatted by tungstenite's frame
//! primitives; this file only keeps the client's side of the protocol
//! (masking, answering pings and the close).

use std::io::{self, Cursor};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tungstenite::protocol::frame::{
    coding::{CloseCode as TsCloseCode, Control, Data, OpCode},
    Frame, FrameHeader,
};

use crate::message::{CloseFrame, Message, Utf8Bytes};

/// The largest message the test client accepts (the server's default limit
/// is 1 MiB; tests may raise it).
const MAX_MESSAGE: usize = 64 << 20;

/// The client's end of the connection: an in-memory pipe, or the upgraded
/// HTTP/1.1 connection of a handshake through a whole service.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug> Io for T {}

#[derive(Debug)]
pub(crate) struct Client {
    io: Box<dyn Io>,
    buf: BytesMut,
    /// A fragmented message being assembled: (text, payload).
    partial: Option<(bool, Vec<u8>)>,
    close_sent: bool,
    mask_seed: u32,
}

impl Client {
    pub(crate) fn new(io: impl Io + 'static) -> Self {
        Self {
            io: Box::new(io),
            buf: BytesMut::new(),
            partial: None,
            close_sent: false,
            mask_seed: 0x9e37_79b9,
        }
    }

    fn mask(&mut self) -> [u8; 4] {
        // Masking only has to be present for an in-process peer (RFC 6455's
        // unpredictability protects proxies, which do not exist here).
        self.mask_seed = self
            .mask_seed
            .wrapping_mul(1_664_525)
            .wrapping_add(1_013_904_223);
        self.mask_seed.to_be_bytes()
    }

    pub(crate) async fn send(&mut self, message: Message) -> io::Result<()> {
        let frame = match message {
            Message::Text(t) => {
                Frame::message(t.as_bytes().clone(), OpCode::Data(Data::Text), true)
            }
            Message::Binary(b) => Frame::message(b, OpCode::Data(Data::Binary), true),
            Message::Ping(b) => Frame::ping(b),
            Message::Pong(b) => Frame::pong(b),
            Message::Close(c) => {
                self.close_sent = true;
                Frame::close(c.map(|c| tungstenite::protocol::CloseFrame {
                    code: TsCloseCode::from(c.code),
                    reason: c.reason.as_str().into(),
                }))
            }
        };
        self.write_frame(frame).await
    }

    async fn write_frame(&mut self, mut frame: Frame) -> io::Result<()> {
        frame.header_mut().mask = Some(self.mask());
        let mut out = Vec::with_capacity(frame.len());
        frame.format(&mut out).map_err(io::Error::other)?;
        self.io.write_all(&out).await?;
        self.io.flush().await
    }

    /// The next data message or close; answers pings and the server's close.
    /// `None` at the end of the stream.
    pub(crate) async fn next(&mut self) -> Option<io::Result<Message>> {
        loop {
            let frame = match self.next_frame().await {
                Ok(Some(f)) => f,
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            };
            let opcode = frame.header().opcode;
            let fin = frame.header().is_final;
            let payload = frame.into_payload();
            let data = match opcode {
                OpCode::Control(Control::Ping) => {
                    if let Err(e) = self.write_frame(Frame::pong(payload)).await {
                        return Some(Err(e));
                    }
                    continue;
                }
                OpCode::Control(Control::Pong) => continue,
                OpCode::Control(Control::Close) => {
                    let close = parse_close(&payload);
                    if !self.close_sent {
                        self.close_sent = true;
                        let reply = close.as_ref().map(|c| CloseFrame::new(c.code, ""));
                        let _ = self.send(Message::Close(reply)).await;
                    }
                    return Some(Ok(Message::Close(close)));
                }
                OpCode::Data(Data::Text) => (true, payload.to_vec()),
                OpCode::Data(Data::Binary) => (false, payload.to_vec()),
                OpCode::Data(Data::Continue) => match self.partial.take() {
                    Some((text, mut data)) => {
                        data.extend_from_slice(&payload);
                        (text, data)
                    }
                    None => return Some(Err(invalid("continuation without a message"))),
                },
                _ => return Some(Err(invalid("reserved opcode"))),
            };
            if data.1.len() > MAX_MESSAGE {
                return Some(Err(invalid("message too large for the test client")));
            }
            if !fin {
                self.partial = Some(data);
                continue;
            }
            let (text, data) = data;
            return Some(if text {
                Utf8Bytes::try_from_bytes(data.into())
                    .map(Message::Text)
                    .map_err(|_| invalid("invalid utf-8 from the server"))
            } else {
                Ok(Message::Binary(data.into()))
            });
        }
    }

    async fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            let mut cursor = Cursor::new(&self.buf[..]);
            if let Some((header, len)) =
                FrameHeader::parse(&mut cursor).map_err(io::Error::other)?
            {
                if header.rsv1 || header.rsv2 || header.rsv3 {
                    return Err(invalid("the test client negotiates no extension"));
                }
                let start = usize::try_from(cursor.position()).map_err(io::Error::other)?;
                let len = usize::try_from(len).map_err(io::Error::other)?;
                if len > MAX_MESSAGE {
                    return Err(invalid("frame too large for the test client"));
                }
                if self.buf.len() >= start + len {
                    self.buf.advance(start);
                    let payload = self.buf.split_to(len).freeze();
                    if self.buf.is_empty() {
                        self.buf = BytesMut::new();
                    }
                    return Ok(Some(Frame::from_payload(header, payload)));
                }
            }
            self.buf.reserve(8 << 10);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Flushes what is buffered (nothing is: every send writes through).
    pub(crate) async fn flush(&mut self) -> io::Result<()> {
        self.io.flush().await
    }
}

fn parse_close(payload: &[u8]) -> Option<CloseFrame> {
    if payload.len() < 2 {
        return None;
    }
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    let reason = std::str::from_utf8(&payload[2..]).unwrap_or("");
    Some(CloseFrame::new(code, reason))
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}
