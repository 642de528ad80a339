/**
 * NBD server (fixed newstyle only) exporting one BlockDevice over TCP and/or unix sockets.
 * Requests on a connection are parsed as they arrive and served concurrently; replies go out
 * in completion order.
 */
import net from 'node:net';
import fs from 'node:fs';
import type { BlockDevice } from '../cache/block-device.js';
import {
  ByteQueue,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_ENOSPC,
  NBD_EIO,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_C_KNOWN,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REPLY_FLAG_DONE,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_SERVER,
  OPTION_HEADER_SIZE,
  REQUEST_HEADER_SIZE,
  commandName,
  decodeInfoRequest,
  decodeOptionHeader,
  decodeRequestHeader,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeOptionReply,
  encodeRepServer,
  encodeSimpleReply,
  errnoFromError,
  nbdErrorName,
  optionName,
  requestMagicOk,
  type RequestHeader,
} from './protocol.js';

export interface NbdServerOptions {
  device: BlockDevice;
  /** Name of the single export; '' (the default export) is also accepted for it. */
  exportName?: string;
  description?: string;
  /** Largest READ/WRITE length accepted, advertised as the maximum block size. Default 32 MiB. */
  maxBlock?: number;
  log?: (msg: string) => void;
  /** Sees connections and finished device requests, for metrics and logs; must not throw. */
  observer?: NbdServerObserver;
}

/** Hooks for whoever watches the server; each call is cheap and synchronous. */
export interface NbdServerObserver {
  connected?(peer: string): void;
  disconnected?(peer: string): void;
  /** A device request (READ, WRITE, FLUSH, TRIM, WRITE_ZEROES) replied to; `error` when it failed. */
  requestDone?(op: string, bytes: number, seconds: number, error?: unknown): void;
}

export interface NbdServerStats {
  connectionsTotal: number;
  connectionsActive: number;
  requests: {
    read: number;
    write: number;
    flush: number;
    trim: number;
    writeZeroes: number;
    disc: number;
    other: number;
  };
  bytesRead: number;
  bytesWritten: number;
  /** Error replies sent (validation failures and device errors). */
  errors: number;
  /** Of those, failures reported by the device. */
  deviceErrors: number;
  /** Connections dropped because the peer broke the protocol. */
  protocolErrors: number;
}

export interface NbdServer {
  listenTcp(host: string, port: number): Promise<{ host: string; port: number }>;
  listenUnix(path: string): Promise<{ path: string }>;
  /**
   * Stops accepting. Graceful (default): requests already received finish and get their
   * replies, then sockets close. force: sockets are destroyed at once. Either way the promise
   * settles only after every device call the server started has settled.
   */
  close(opts?: { force?: boolean }): Promise<void>;
  stats(): NbdServerStats;
}

export const MIN_BLOCK = 512;
export const PREFERRED_BLOCK = 4096;
export const DEFAULT_MAX_BLOCK = 32 * 1024 * 1024;
/**
 * Oversized WRITE payloads up to this length are read and thrown away so the connection stays
 * in sync; beyond it the connection is closed (proto.md lets a server treat such a payload as
 * a denial of service). Discarding never buffers, so this bounds time, not memory.
 */
export const DISCARD_LIMIT = 64 * 1024 * 1024;
/** Option payloads are at most a 4 KiB name plus a few fields; anything far larger is abuse. */
const MAX_OPTION_LENGTH = 64 * 1024;
// Backpressure: stop reading from a client while it has this much outstanding.
const MAX_INFLIGHT_REQUESTS = 256;
const MAX_INFLIGHT_BYTES = 256 * 1024 * 1024;
const MAX_UNSENT_BYTES = 64 * 1024 * 1024;
/** How long a graceful close waits for the peer to close its side before destroying. */
const LINGER_MS = 2000;

const TRANSMISSION_FLAGS =
  NBD_FLAG_HAS_FLAGS |
  NBD_FLAG_SEND_FLUSH |
  NBD_FLAG_SEND_FUA |
  NBD_FLAG_SEND_TRIM |
  NBD_FLAG_SEND_WRITE_ZEROES |
  NBD_FLAG_CAN_MULTI_CONN;

class ConnectionClosed extends Error {
  override name = 'ConnectionClosed';
}

/** Raised inside the handshake when the peer breaks the protocol. */
class HandshakeAbort extends Error {
  override name = 'HandshakeAbort';
}

interface Shared {
  device: BlockDevice;
  exportName: string;
  description: string | undefined;
  maxBlock: number;
  log: (msg: string) => void;
  observer: NbdServerObserver | undefined;
  stats: NbdServerStats;
  closing: boolean;
  /** Device calls not yet settled, across all connections. */
  deviceCalls: Set<Promise<unknown>>;
}

export function createNbdServer(opts: NbdServerOptions): NbdServer {
  const maxBlock = opts.maxBlock ?? DEFAULT_MAX_BLOCK;
  if (!Number.isInteger(maxBlock) || maxBlock % MIN_BLOCK !== 0 || maxBlock < PREFERRED_BLOCK || maxBlock > 1 << 30) {
    throw new RangeError(`maxBlock must be a multiple of ${MIN_BLOCK} between ${PREFERRED_BLOCK} and 1 GiB`);
  }
  const exportName = opts.exportName ?? '';
  if (Buffer.byteLength(exportName) > 4096) throw new RangeError('export name longer than 4096 bytes');
  const log = opts.log ?? (() => {});
  if (opts.device.size() % MIN_BLOCK !== 0) {
    log(`device size ${opts.device.size()} is not a multiple of ${MIN_BLOCK}; the tail is unreachable`);
  }
  const shared: Shared = {
    device: opts.device,
    exportName,
    description: opts.description,
    maxBlock,
    log,
    observer: opts.observer,
    stats: {
      connectionsTotal: 0,
      connectionsActive: 0,
      requests: { read: 0, write: 0, flush: 0, trim: 0, writeZeroes: 0, disc: 0, other: 0 },
      bytesRead: 0,
      bytesWritten: 0,
      errors: 0,
      deviceErrors: 0,
      protocolErrors: 0,
    },
    closing: false,
    deviceCalls: new Set(),
  };
  const listeners: net.Server[] = [];
  const connections = new Set<Connection>();
  let closePromise: Promise<void> | null = null;

  const onConnection = (socket: net.Socket): void => {
    if (shared.closing) {
      socket.destroy();
      return;
    }
    const conn = new Connection(socket, shared);
    connections.add(conn);
    conn.closed.then(() => connections.delete(conn));
  };

  const newListener = (): net.Server => {
    const srv = net.createServer({ allowHalfOpen: true }, onConnection);
    srv.on('error', (err) => log(`listener error: ${err.message}`));
    return srv;
  };

  const listen = (srv: net.Server, args: net.ListenOptions): Promise<void> =>
    new Promise((resolve, reject) => {
      const onError = (err: Error): void => reject(err);
      srv.once('error', onError);
      srv.listen(args, () => {
        srv.off('error', onError);
        resolve();
      });
    });

  return {
    async listenTcp(host, port) {
      if (shared.closing) throw new Error('server is closed');
      const srv = newListener();
      await listen(srv, { host, port });
      listeners.push(srv);
      const addr = srv.address() as net.AddressInfo;
      log(`listening on ${addr.address}:${addr.port}`);
      return { host: addr.address, port: addr.port };
    },

    async listenUnix(path) {
      if (shared.closing) throw new Error('server is closed');
      await removeStaleSocket(path);
      const srv = newListener();
      await listen(srv, { path });
      listeners.push(srv);
      log(`listening on ${path}`);
      return { path };
    },

    close(closeOpts = {}) {
      const force = closeOpts.force === true;
      if (closePromise && !force) return closePromise;
      shared.closing = true;
      for (const conn of connections) conn.shutdown(force);
      const previous = closePromise;
      closePromise = (async () => {
        await Promise.all(listeners.map((srv) => new Promise<void>((resolve) => srv.close(() => resolve()))));
        await Promise.all([...connections].map((c) => c.closed));
        // Device calls cannot be cancelled; the caller may close the device once we return.
        while (shared.deviceCalls.size > 0) await Promise.allSettled([...shared.deviceCalls]);
        if (previous) await previous;
      })();
      return closePromise;
    },

    stats() {
      return structuredClone(shared.stats);
    },
  };
}

/** Removes a leftover socket file from a dead server, but never a live one or a non-socket. */
async function removeStaleSocket(path: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = await fs.promises.lstat(path);
  } catch {
    return;
  }
  if (!st.isSocket()) return; // let listen fail with EADDRINUSE
  const alive = await new Promise<boolean>((resolve) => {
    const probe = net.connect({ path });
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (!alive) await fs.promises.unlink(path).catch(() => {});
}

type Phase = 'handshake' | 'transmission' | 'closing' | 'closed';

class Connection {
  readonly closed: Promise<void>;
  private resolveClosed!: () => void;
  private readonly queue = new ByteQueue();
  private phase: Phase = 'handshake';
  private readonly peer: string;
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private eof = false;
  private structured = false;
  private noZeroes = false;
  private size = 0;
  private inflight = 0;
  private inflightBytes = 0;
  /**
   * A WRITE whose header is parsed but whose payload has not fully arrived. Its payload buffer
   * is filled straight from each socket chunk as it comes, while the bytes are still in cache,
   * instead of queueing the chunks and gathering them at the end.
   */
  private pendingWrite: RequestHeader | null = null;
  private payload: Buffer | null = null;
  private payloadFilled = 0;
  private discardRemaining = 0;
  private paused = false;
  private corked = false;
  private awaitingDrain = false;
  private lingerTimer: NodeJS.Timeout | null = null;

  constructor(
    private readonly socket: net.Socket,
    private readonly shared: Shared,
  ) {
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
    this.peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
    shared.stats.connectionsTotal++;
    shared.stats.connectionsActive++;
    if (socket.remoteAddress) socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('end', () => this.onEnd());
    socket.on('error', (err: NodeJS.ErrnoException) => {
      // EPIPE/ECONNRESET are routine when a client goes away; 'close' follows.
      this.shared.log(`${this.peer}: socket error: ${err.code ?? err.message}`);
    });
    socket.on('close', () => this.onClose());
    this.shared.log(`${this.peer}: connected`);
    shared.observer?.connected?.(this.peer);
    this.handshake().then(
      (ok) => {
        if (ok) this.startTransmission();
      },
      (err: unknown) => {
        if (err instanceof ConnectionClosed) return;
        if (err instanceof HandshakeAbort) {
          this.shared.stats.protocolErrors++;
          this.shared.log(`${this.peer}: handshake: ${err.message}`);
        } else {
          this.shared.log(`${this.peer}: handshake failed: ${String(err)}`);
        }
        this.socket.destroy();
      },
    );
  }

  /** Called by server.close(). */
  shutdown(force: boolean): void {
    if (this.phase === 'closed') return;
    if (force) {
      this.socket.destroy();
      return;
    }
    if (this.phase === 'handshake') {
      // Nothing is in flight yet; a handshaking client may idle forever, so do not wait for it.
      this.endGracefully();
      return;
    }
    this.stopAndDrain();
  }

  // ------------------------------------------------------------------------------------------
  // Input

  private onData(chunk: Buffer): void {
    if (this.phase === 'closed' || this.phase === 'closing') return;
    if (this.discardRemaining > 0 && this.queue.length === 0) {
      // Throwing away an oversized payload: drop what we can before it is ever queued.
      const n = Math.min(this.discardRemaining, chunk.length);
      this.discardRemaining -= n;
      if (n === chunk.length) return;
      chunk = chunk.subarray(n);
    }
    const payload = this.payload;
    if (payload && this.queue.length === 0) {
      const n = Math.min(payload.length - this.payloadFilled, chunk.length);
      chunk.copy(payload, this.payloadFilled, 0, n);
      this.payloadFilled += n;
      if (this.payloadFilled < payload.length) return;
      chunk = chunk.subarray(n);
      this.processRequests();
      if (chunk.length === 0) return;
    }
    this.queue.push(chunk);
    if (this.phase === 'handshake') {
      const w = this.waiter;
      if (w && this.queue.length >= w.n) {
        this.waiter = null;
        w.resolve(this.queue.take(w.n));
      }
    } else if (this.phase === 'transmission') {
      this.processRequests();
    }
  }

  private onEnd(): void {
    this.eof = true;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.reject(new ConnectionClosed());
    }
    if (this.phase === 'transmission') {
      if (this.pendingWrite || this.queue.length > 0) {
        this.shared.log(`${this.peer}: client closed with a truncated request`);
      }
      this.stopAndDrain();
    } else if (this.phase === 'handshake') {
      this.socket.end();
    }
  }

  private onClose(): void {
    if (this.phase === 'closed') return;
    this.phase = 'closed';
    if (this.lingerTimer) clearTimeout(this.lingerTimer);
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.reject(new ConnectionClosed());
    }
    this.queue.clear();
    this.shared.stats.connectionsActive--;
    this.shared.log(`${this.peer}: closed`);
    this.shared.observer?.disconnected?.(this.peer);
    this.resolveClosed();
  }

  private read(n: number): Promise<Buffer> {
    if (this.queue.length >= n) return Promise.resolve(this.queue.take(n));
    if (this.eof || this.phase === 'closed') return Promise.reject(new ConnectionClosed());
    return new Promise((resolve, reject) => (this.waiter = { n, resolve, reject }));
  }

  // ------------------------------------------------------------------------------------------
  // Handshake

  /** Resolves true when the client entered transmission, false when it left cleanly. */
  private async handshake(): Promise<boolean> {
    this.send(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
    const clientFlags = (await this.read(4)).readUInt32BE(0);
    if ((clientFlags & ~NBD_FLAG_C_KNOWN) !== 0) {
      throw new HandshakeAbort(`unknown client flags 0x${clientFlags.toString(16)}`);
    }
    this.noZeroes = (clientFlags & NBD_FLAG_C_NO_ZEROES) !== 0;

    for (;;) {
      const header = await this.read(OPTION_HEADER_SIZE);
      let opt;
      try {
        opt = decodeOptionHeader(header);
      } catch (err) {
        throw new HandshakeAbort((err as Error).message);
      }
      if (opt.length > MAX_OPTION_LENGTH) {
        throw new HandshakeAbort(`option ${optionName(opt.option)} with ${opt.length} bytes of data`);
      }
      const data = await this.read(opt.length);
      if (this.shared.closing) {
        this.endGracefully();
        return false;
      }
      switch (opt.option) {
        case NBD_OPT_EXPORT_NAME: {
          const name = data.toString('utf8');
          if (!this.knownExport(name)) {
            // EXPORT_NAME cannot carry an error: proto.md requires terminating the session.
            this.shared.log(`${this.peer}: EXPORT_NAME for unknown export '${name}'`);
            this.endGracefully();
            return false;
          }
          this.size = this.shared.device.size();
          this.send(encodeExportNameReply(this.size, this.transmissionFlags(), this.noZeroes));
          return true;
        }
        case NBD_OPT_ABORT:
          this.replyOption(opt.option, NBD_REP_ACK);
          this.endGracefully();
          return false;
        case NBD_OPT_LIST:
          if (data.length !== 0) {
            this.replyOption(opt.option, NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
            break;
          }
          this.replyOption(opt.option, NBD_REP_SERVER, encodeRepServer(this.shared.exportName, this.shared.description ?? ''));
          this.replyOption(opt.option, NBD_REP_ACK);
          break;
        case NBD_OPT_INFO:
        case NBD_OPT_GO: {
          const req = decodeInfoRequest(data);
          if (!req) {
            this.replyOption(opt.option, NBD_REP_ERR_INVALID, 'malformed NBD_OPT_INFO/GO data');
            break;
          }
          if (!this.knownExport(req.name)) {
            this.replyOption(opt.option, NBD_REP_ERR_UNKNOWN, `no export named '${req.name}'`);
            break;
          }
          const size = this.shared.device.size();
          this.replyOption(opt.option, NBD_REP_INFO, encodeInfoExport(size, this.transmissionFlags()));
          if (req.requests.includes(NBD_INFO_NAME)) {
            this.replyOption(opt.option, NBD_REP_INFO, encodeInfoString(NBD_INFO_NAME, this.shared.exportName));
          }
          if (req.requests.includes(NBD_INFO_DESCRIPTION) && this.shared.description !== undefined) {
            this.replyOption(opt.option, NBD_REP_INFO, encodeInfoString(NBD_INFO_DESCRIPTION, this.shared.description));
          }
          // Sent even when not asked: we enforce a 512-byte minimum, which is not the default.
          this.replyOption(
            opt.option,
            NBD_REP_INFO,
            encodeInfoBlockSize(MIN_BLOCK, PREFERRED_BLOCK, this.shared.maxBlock),
          );
          this.replyOption(opt.option, NBD_REP_ACK);
          if (opt.option === NBD_OPT_GO) {
            this.size = size;
            return true;
          }
          break;
        }
        case NBD_OPT_STRUCTURED_REPLY:
          if (data.length !== 0) {
            this.replyOption(opt.option, NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
            break;
          }
          this.structured = true;
          this.replyOption(opt.option, NBD_REP_ACK);
          break;
        default:
          // STARTTLS, meta contexts, extended headers and anything unknown.
          this.replyOption(opt.option, NBD_REP_ERR_UNSUP, `option ${optionName(opt.option)} not supported`);
          break;
      }
    }
  }

  private knownExport(name: string): boolean {
    return name === this.shared.exportName || name === '';
  }

  private transmissionFlags(): number {
    // Reads are always answered with a single data chunk, so DF costs nothing to honour;
    // proto.md forbids the flag without structured replies.
    return this.structured ? TRANSMISSION_FLAGS | NBD_FLAG_SEND_DF : TRANSMISSION_FLAGS;
  }

  private replyOption(option: number, type: number, data?: Buffer | string): void {
    const payload = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
    this.send(encodeOptionReply(option, type, payload));
  }

  // ------------------------------------------------------------------------------------------
  // Transmission

  private startTransmission(): void {
    if (this.phase !== 'handshake') return;
    this.phase = 'transmission';
    this.shared.log(`${this.peer}: transmission (structured replies: ${this.structured})`);
    if (this.eof) {
      this.stopAndDrain();
      return;
    }
    this.processRequests();
  }

  /** Parses and dispatches every complete request buffered so far. */
  private processRequests(): void {
    while (this.phase === 'transmission') {
      if (this.discardRemaining > 0) {
        this.discardRemaining -= this.queue.skip(this.discardRemaining);
        if (this.discardRemaining > 0) return;
      }
      if (this.overloaded()) {
        if (!this.paused) {
          this.paused = true;
          this.socket.pause();
          if (this.socket.writableLength > 0) this.watchDrain();
        }
        return;
      }
      let req: RequestHeader;
      let payload: Buffer | undefined;
      if (this.pendingWrite) {
        const buf = this.payload!;
        const n = Math.min(buf.length - this.payloadFilled, this.queue.length);
        this.queue.takeInto(buf, this.payloadFilled, n);
        this.payloadFilled += n;
        if (this.payloadFilled < buf.length) return;
        req = this.pendingWrite;
        payload = buf;
        this.pendingWrite = null;
        this.payload = null;
        this.payloadFilled = 0;
      } else {
        if (this.queue.length < REQUEST_HEADER_SIZE) return;
        const header = this.queue.take(REQUEST_HEADER_SIZE);
        if (!requestMagicOk(header)) {
          this.protocolError(`bad request magic 0x${header.readUInt32BE(0).toString(16)}`);
          return;
        }
        req = decodeRequestHeader(header);
        if (req.type === NBD_CMD_WRITE) {
          if (req.length > this.shared.maxBlock) {
            this.rejectOversizedWrite(req);
            continue;
          }
          if (this.queue.length >= req.length) {
            // Usually lies within one socket chunk, and then it is a view, not a copy.
            payload = this.queue.take(req.length);
          } else {
            this.pendingWrite = req;
            this.payload = Buffer.allocUnsafe(req.length);
            this.payloadFilled = this.queue.length;
            this.queue.takeInto(this.payload, 0, this.queue.length);
            return;
          }
        }
      }
      this.dispatch(req, payload);
    }
  }

  private overloaded(): boolean {
    return (
      this.inflight >= MAX_INFLIGHT_REQUESTS ||
      this.inflightBytes >= MAX_INFLIGHT_BYTES ||
      this.socket.writableLength >= MAX_UNSENT_BYTES
    );
  }

  private maybeResume(): void {
    if (!this.paused || this.phase !== 'transmission' || this.overloaded()) return;
    this.paused = false;
    this.socket.resume();
    this.processRequests();
  }

  private rejectOversizedWrite(req: RequestHeader): void {
    this.shared.stats.requests.write++;
    const msg = `write of ${req.length} bytes exceeds the maximum block size ${this.shared.maxBlock}`;
    this.replyError(req, NBD_EINVAL, msg);
    if (req.length > DISCARD_LIMIT) {
      this.protocolError(msg);
      return;
    }
    this.discardRemaining = req.length;
  }

  /** Validation shared by all data commands; returns an errno or 0. */
  private checkRange(req: RequestHeader, outOfRangeError: number): number {
    if (req.offset + req.length > this.size) return outOfRangeError;
    if (req.offset % MIN_BLOCK !== 0 || req.length % MIN_BLOCK !== 0) return NBD_EINVAL;
    return 0;
  }

  private dispatch(req: RequestHeader, payload: Buffer | undefined): void {
    const stats = this.shared.stats;
    const fua = (req.flags & NBD_CMD_FLAG_FUA) !== 0;
    switch (req.type) {
      case NBD_CMD_READ: {
        stats.requests.read++;
        const allowed = NBD_CMD_FLAG_FUA | (this.structured ? NBD_CMD_FLAG_DF : 0);
        if ((req.flags & ~allowed) !== 0) return this.replyError(req, NBD_EINVAL, 'invalid flags for READ');
        if (req.length > this.shared.maxBlock) {
          return this.replyError(req, NBD_EINVAL, `read of ${req.length} bytes exceeds the maximum block size`);
        }
        const bad = this.checkRange(req, NBD_EINVAL);
        if (bad) return this.replyError(req, bad, 'read out of range or unaligned');
        if (req.length === 0) return this.replyRead(req, Buffer.alloc(0));
        this.run(req, req.length, () => this.shared.device.read(req.offset, req.length), (data) => {
          if (!Buffer.isBuffer(data) || data.length !== req.length) {
            // A short buffer would desynchronise the stream; report it rather than pad with zeros.
            this.deviceFailed(req, new Error(`device returned ${Buffer.isBuffer(data) ? data.length : typeof data} bytes for a ${req.length}-byte read`));
            return;
          }
          stats.bytesRead += data.length;
          this.replyRead(req, data);
        });
        return;
      }
      case NBD_CMD_WRITE: {
        stats.requests.write++;
        if ((req.flags & ~NBD_CMD_FLAG_FUA) !== 0) return this.replyError(req, NBD_EINVAL, 'invalid flags for WRITE');
        const bad = this.checkRange(req, NBD_ENOSPC);
        if (bad) return this.replyError(req, bad, 'write out of range or unaligned');
        if (req.length === 0) return this.replyOk(req);
        const data = payload!;
        this.run(req, req.length, () => this.shared.device.write(req.offset, data, fua ? { fua } : undefined), () => {
          stats.bytesWritten += req.length;
          this.replyOk(req);
        });
        return;
      }
      case NBD_CMD_FLUSH: {
        stats.requests.flush++;
        if ((req.flags & ~NBD_CMD_FLAG_FUA) !== 0) return this.replyError(req, NBD_EINVAL, 'invalid flags for FLUSH');
        if (req.offset !== 0 || req.length !== 0) return this.replyError(req, NBD_EINVAL, 'FLUSH offset and length must be zero');
        this.run(req, 0, () => this.shared.device.flush(), () => this.replyOk(req));
        return;
      }
      case NBD_CMD_TRIM:
      case NBD_CMD_WRITE_ZEROES: {
        const isTrim = req.type === NBD_CMD_TRIM;
        if (isTrim) stats.requests.trim++;
        else stats.requests.writeZeroes++;
        const allowed = isTrim ? NBD_CMD_FLAG_FUA : NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE;
        if ((req.flags & ~allowed) !== 0) return this.replyError(req, NBD_EINVAL, `invalid flags for ${commandName(req.type)}`);
        // proto.md: TRIM beyond the end is EINVAL, WRITE_ZEROES beyond the end is ENOSPC.
        const bad = this.checkRange(req, isTrim ? NBD_EINVAL : NBD_ENOSPC);
        if (bad) return this.replyError(req, bad, `${commandName(req.type)} out of range or unaligned`);
        if (req.length === 0) return this.replyOk(req);
        this.run(req, 0, () => this.shared.device.writeZeroes(req.offset, req.length, fua ? { fua } : undefined), () =>
          this.replyOk(req),
        );
        return;
      }
      case NBD_CMD_DISC:
        stats.requests.disc++;
        this.shared.log(`${this.peer}: disconnect requested`);
        this.stopAndDrain();
        return;
      default:
        stats.requests.other++;
        this.replyError(req, NBD_EINVAL, `unsupported command ${commandName(req.type)}`);
        return;
    }
  }

  /** Runs one device call, tracking it for backpressure and for server.close(). */
  private run<T>(req: RequestHeader, bytes: number, call: () => Promise<T>, done: (value: T) => void): void {
    this.inflight++;
    this.inflightBytes += bytes;
    const started = this.shared.observer?.requestDone ? process.hrtime.bigint() : 0n;
    let p: Promise<T>;
    try {
      p = call();
    } catch (err) {
      p = Promise.reject(err);
    }
    // Reply first, then settle: settling the last request of a closing connection ends it.
    const tracked = p.then(
      (value) => {
        done(value);
        if (started) this.observeDone(req, started);
        this.settle(bytes);
      },
      (err: unknown) => {
        this.deviceFailed(req, err);
        if (started) this.observeDone(req, started, err);
        this.settle(bytes);
      },
    );
    this.shared.deviceCalls.add(tracked);
    tracked.finally(() => this.shared.deviceCalls.delete(tracked));
  }

  private observeDone(req: RequestHeader, started: bigint, err?: unknown): void {
    this.shared.observer!.requestDone!(commandName(req.type), req.length, Number(process.hrtime.bigint() - started) / 1e9, err);
  }

  private settle(bytes: number): void {
    this.inflight--;
    this.inflightBytes -= bytes;
    if (this.phase === 'closing' && this.inflight === 0) this.endGracefully();
    else if (this.paused) this.maybeResume();
  }

  private deviceFailed(req: RequestHeader, err: unknown): void {
    const errno = errnoFromError(err);
    this.shared.stats.deviceErrors++;
    const detail = err instanceof Error ? err.message : String(err);
    this.shared.log(`${this.peer}: ${commandName(req.type)} offset=${req.offset} length=${req.length} failed: ${detail}`);
    this.replyError(req, errno, `${nbdErrorName(errno)}: ${detail}`);
  }

  // ------------------------------------------------------------------------------------------
  // Output

  private replyOk(req: RequestHeader): void {
    this.send(encodeSimpleReply(req.handle, 0));
  }

  private replyRead(req: RequestHeader, data: Buffer): void {
    if (!this.structured) {
      this.send(encodeSimpleReply(req.handle, 0), data);
    } else if (data.length === 0) {
      this.send(encodeNoneChunk(req.handle));
    } else {
      // The whole buffer is in hand, so no later error is possible and the chunk can be final.
      this.send(encodeOffsetDataHeader(req.handle, NBD_REPLY_FLAG_DONE, req.offset, data.length), data);
    }
  }

  private replyError(req: RequestHeader, errno: number, message: string): void {
    this.shared.stats.errors++;
    if (errno === 0) errno = NBD_EIO;
    if (this.structured) {
      // Structured replies let the error carry a message; for READ they are mandatory.
      this.send(encodeErrorChunk(req.handle, NBD_REPLY_FLAG_DONE, errno, message));
    } else {
      this.send(encodeSimpleReply(req.handle, errno));
    }
  }

  /**
   * Queues buffers on the socket. All buffers of one message are written in the same tick, so
   * messages never interleave; corking until the next tick lets replies that complete together
   * leave in one writev.
   */
  private send(a: Buffer, b?: Buffer): void {
    const s = this.socket;
    if (s.destroyed || s.writableEnded) return;
    if (!this.corked) {
      this.corked = true;
      s.cork();
      process.nextTick(() => {
        this.corked = false;
        s.uncork();
      });
    }
    let ok = s.write(a);
    if (b && b.length > 0) ok = s.write(b) && ok;
    if (!ok) this.watchDrain();
  }

  private watchDrain(): void {
    if (this.awaitingDrain) return;
    this.awaitingDrain = true;
    this.socket.once('drain', () => {
      this.awaitingDrain = false;
      this.maybeResume();
    });
  }

  // ------------------------------------------------------------------------------------------
  // Shutdown

  /** Stops taking requests; once the in-flight ones have replied, closes the socket. */
  private stopAndDrain(): void {
    if (this.phase === 'closed' || this.phase === 'closing') return;
    this.phase = 'closing';
    this.pendingWrite = null;
    this.payload = null;
    this.queue.clear();
    this.socket.pause();
    if (this.inflight === 0) this.endGracefully();
  }

  private protocolError(message: string): void {
    this.shared.stats.protocolErrors++;
    this.shared.log(`${this.peer}: protocol error: ${message}; closing connection`);
    this.stopAndDrain();
  }

  private endGracefully(): void {
    if (this.phase === 'closed') return;
    if (this.phase !== 'closing') this.phase = 'closing';
    if (!this.socket.writableEnded) this.socket.end();
    // Keep draining input so the peer's data never makes our close an RST that drops replies.
    this.socket.resume();
    this.socket.removeAllListeners('data');
    this.socket.on('data', () => {});
    if (!this.lingerTimer) {
      this.lingerTimer = setTimeout(() => this.socket.destroy(), LINGER_MS);
      this.lingerTimer.unref();
    }
  }
}
