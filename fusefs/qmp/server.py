"""The control socket's trio server: accept clients on a Unix socket, run each client's
commands one after the other (as QEMU's monitor does, without OOB) and broadcast events
to every client that finished capabilities negotiation. The QMP itself is
`protocol.QMPProtocol`'s; this module only moves bytes and bounds what a client may
make the daemon hold."""

import errno
import logging
import os
import socket
import stat

import trio

from commit.qapi import COMMAND_NOT_FOUND, GENERIC_ERROR, QMPError
from qcow.errors import QcowError

from .address import short_address
from .protocol import QMPProtocol, event_timestamp

log = logging.getLogger("qcowfs.qmp")


class _Client:
    MAX_QUEUED = 1 << 20  # a client that does not read its replies and events is dropped past this

    def __init__(self, server, stream, number):
        self.stream = stream
        self.number = number
        self.proto = QMPProtocol(server.commands, schema=server.schema)
        self.queue = []
        self.queued = 0
        self.wakeup = trio.Event()
        self.closed = False
        self.overflow = False
        self.in_handler = False
        self.reader_scope = trio.CancelScope()
        self.writer_done = trio.Event()

    def send(self, data):
        if self.closed:
            return
        if self.queued + len(data) > self.MAX_QUEUED:
            self.drop("does not read its messages")
            return
        self.queue.append(data)
        self.queued += len(data)
        self.wakeup.set()

    def drop(self, why):
        """Disconnect now, without sending what is queued."""
        log.warning("QMP client %d %s; disconnecting it", self.number, why)
        self.overflow = True
        self.closed = True
        self.wakeup.set()
        if not self.in_handler:
            self.reader_scope.cancel()

    @property
    def buffered(self):
        return self.queued + self.proto.pending


class QMPServer:
    """A QMP server on a Unix socket, for several clients at once.

    `commands` maps a command name to `async handler(arguments) -> return value` (None
    means `{}`); the dict is consulted live, so commands may be added after construction.
    A handler raises `QMPError(cls, desc)` for an error reply; a `QcowError` becomes a
    GenericError with its message; anything else is logged and becomes a GenericError.
    Arguments are checked against `schema` (default: commit.qapi.SCHEMA) first.

    A client cannot starve the mount: input is parsed in slices with a checkpoint
    between them, and a client is disconnected when it sends a value past the parser's
    limits, lets its unread output pass `_Client.MAX_QUEUED`, or would push the bytes
    buffered for all clients past MAX_BUFFERED. At most MAX_CLIENTS are served.
    """

    MAX_CLIENTS = 32
    MAX_BUFFERED = 8 << 20
    SLICE = 4096  # bytes parsed between two checkpoints
    BACKLOG = 16

    def __init__(self, socket_path, commands, *, schema=None):
        self.socket_path = os.fspath(socket_path)
        self.commands = commands
        self.schema = schema
        self._clients = set()
        self._numbers = 0
        self._inode = None
        self.serving = False

    # -- events
    def emit(self, event, data=None):
        """Send an event (with a timestamp) to every client past negotiation."""
        timestamp = event_timestamp()
        log.debug("event %s %s", event, data)
        for client in list(self._clients):
            line = client.proto.event(event, data, timestamp)
            if line is not None:  # None: not negotiated yet
                client.send(line)

    async def flush(self, timeout=1.0):
        """Wait (at most `timeout` s) until every queued reply and event has been sent."""
        with trio.move_on_after(timeout):
            while any(c.queue for c in self._clients if not c.closed):
                await trio.sleep(0.005)

    # -- socket set-up
    def _prepare_path(self):
        path = self.socket_path
        parent = os.path.dirname(path)
        if parent:
            try:
                os.makedirs(parent, mode=0o700, exist_ok=True)
            except OSError as e:
                raise QcowError(
                    parent, f"cannot create the control socket's directory: {e.strerror}"
                ) from None
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise QcowError(path, "exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            with short_address(path) as addr:
                probe.connect(addr)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale control socket %s", path)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        except OSError as e:
            raise QcowError(
                path, f"cannot probe the existing control socket: {e.strerror or e}"
            ) from None
        finally:
            probe.close()
        raise QcowError(path, "control socket is in use by another process")

    async def _bind(self):
        self._prepare_path()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # created 0600 by the umask: a chmod by name after bind() could be sent
            # through a symlink planted in its place
            old_umask = os.umask(0o177)
            try:
                with short_address(self.socket_path) as addr:
                    await sock.bind(addr)
            finally:
                os.umask(old_umask)
            self._inode = os.lstat(self.socket_path).st_ino
            sock.listen(self.BACKLOG)
        except OSError as e:
            sock.close()
            raise QcowError(
                self.socket_path, f"cannot listen on the control socket: {e.strerror or e}"
            ) from None
        except BaseException:
            sock.close()
            raise
        return sock

    def _remove_socket_file(self):
        try:
            st = os.lstat(self.socket_path)
            if self._inode is not None and stat.S_ISSOCK(st.st_mode) and st.st_ino == self._inode:
                os.unlink(self.socket_path)
        except OSError:
            pass
        self._inode = None

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED):
        """Bind, call `task_status.started(socket_path)`, then serve until cancelled."""
        sock = await self._bind()
        self.serving = True
        log.info("control socket listening on %s", self.socket_path)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.socket_path)
                while True:
                    try:
                        conn, _ = await sock.accept()
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                            log.warning("accept on the control socket failed: %s", e)
                            await trio.sleep(0.1)
                            continue
                        if e.errno in (errno.ECONNABORTED, errno.EINTR):
                            continue
                        raise
                    self._numbers += 1
                    if len(self._clients) >= self.MAX_CLIENTS:
                        log.warning(
                            "control socket: %d clients already; refusing client %d",
                            len(self._clients),
                            self._numbers,
                        )
                        conn.close()
                        continue
                    nursery.start_soon(self._serve_client, conn, self._numbers)
        finally:
            self.serving = False
            sock.close()
            self._remove_socket_file()
            for client in list(self._clients):
                client.closed = True

    async def _serve_client(self, conn, number):
        stream = trio.SocketStream(conn)
        client = _Client(self, stream, number)
        self._clients.add(client)
        log.debug("QMP client %d connected", number)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, client)
                client.send(client.proto.greeting())
                with client.reader_scope:
                    await self._reader(client)
                # the peer closed its side (or we gave up on it): flush, then stop
                client.closed = True
                client.wakeup.set()
                if not client.overflow:  # a dropped client gets nothing more
                    with trio.move_on_after(5.0):
                        await client.writer_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            client.closed = True
            self._clients.discard(client)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            log.debug("QMP client %d disconnected", number)

    async def _writer(self, client):
        try:
            while not client.overflow:
                if not client.queue:
                    if client.closed:
                        break
                    client.wakeup = trio.Event()
                    await client.wakeup.wait()
                    continue
                data = b"".join(client.queue)
                client.queue.clear()
                client.queued = 0
                await client.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            client.closed = True
            client.writer_done.set()
            # a command being executed runs to its end; the reader stops after it
            if not client.in_handler:
                client.reader_scope.cancel()

    async def _reader(self, client):
        while not client.closed:
            try:
                data = await client.stream.receive_some(self.SLICE * 4)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not data:
                return
            for start in range(0, len(data), self.SLICE):
                await trio.lowlevel.checkpoint()
                await self._handle(client, client.proto.feed(data[start : start + self.SLICE]))
                if client.closed:
                    return
                if client.proto.abusive:
                    client.drop("sent a value past the parser's limits")
                    return
                if self._buffered() > self.MAX_BUFFERED:
                    client.drop(
                        f"pushed the control socket's buffers past {self.MAX_BUFFERED} bytes"
                    )
                    return

    def _buffered(self):
        return sum(c.buffered for c in self._clients if not c.closed)

    async def _handle(self, client, actions):
        for action in actions:
            if client.closed:
                return
            if isinstance(action, bytes):
                client.send(action)
            else:
                client.in_handler = True
                try:
                    reply = await self._execute(client, action)
                finally:
                    client.in_handler = False
                client.send(reply)

    async def _execute(self, client, req):
        handler = self.commands.get(req.command)
        proto = client.proto
        if handler is None:  # removed since feed() looked
            return proto.error(
                req, COMMAND_NOT_FOUND, f"The command {req.command} has not been found"
            )
        try:
            value = handler(req.arguments)
            if hasattr(value, "__await__"):
                value = await value
            return proto.reply(req, value)
        except QMPError as e:
            return proto.error(req, e.cls, e.desc)
        except QcowError as e:
            return proto.error(req, GENERIC_ERROR, str(e))
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception as e:
            log.exception("QMP command %s failed", req.command)
            return proto.error(req, GENERIC_ERROR, f"internal error in {req.command}: {e}")
