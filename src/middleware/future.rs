use std::{
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use http::Response;
use pin_project_lite::pin_project;
use sync_wrapper::SyncWrapper;
use tokio::sync::oneshot;

use super::{fallback::HttpResponse, ResponseBody};
use crate::{
    channel_layer::BoxFuture,
    consumer::Decision,
    handshake::{
        self,
        rejection::{ConnectionRejected, HandshakeRejection},
        Kind,
    },
};

pin_project! {
    /// Response future of [`WebSocketService`](super::WebSocketService).
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Inner<F>,
    }
}

pin_project! {
    #[project = InnerProj]
    enum Inner<F> {
        Future { #[pin] future: F },
        Respond { response: Option<Response<Bytes>> },
        Handshake { decision: oneshot::Receiver<Decision>, kind: Kind },
        Http { future: SyncWrapper<BoxFuture<'static, HttpResponse>> },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn future(future: F) -> Self {
        Self {
            inner: Inner::Future { future },
        }
    }

    pub(crate) fn respond(response: Response<Bytes>) -> Self {
        Self {
            inner: Inner::Respond {
                response: Some(response),
            },
        }
    }

    pub(crate) fn http(future: BoxFuture<'static, HttpResponse>) -> Self {
        Self {
            inner: Inner::Http {
                future: SyncWrapper::new(future),
            },
        }
    }

    pub(crate) fn handshake(decision: oneshot::Receiver<Decision>, kind: Kind) -> Self {
        Self {
            inner: Inner::Handshake { decision, kind },
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = match self.project().inner.project() {
            InnerProj::Future { future } => {
                return future
                    .poll(cx)
                    .map(|r| r.map(|res| res.map(ResponseBody::inner)));
            }
            InnerProj::Respond { response } => response
                .take()
                .expect("ResponseFuture polled after completion"),
            InnerProj::Http { future } => {
                let res = ready!(future.get_mut().as_mut().poll(cx));
                return Poll::Ready(Ok(res.map(ResponseBody::http)));
            }
            InnerProj::Handshake { decision, kind } => match ready!(Pin::new(decision).poll(cx)) {
                Ok(Decision::Accept { protocol, headers }) => {
                    handshake::accept_response(kind, protocol.as_deref(), headers)
                }
                Ok(Decision::Reject(response)) => response,
                // The consumer ended without deciding: rejected, as in Django.
                Err(_) => HandshakeRejection::from(ConnectionRejected).into_response(),
            },
        };
        Poll::Ready(Ok(response.map(ResponseBody::full)))
    }
}
