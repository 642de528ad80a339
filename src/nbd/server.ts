/**
 * NBD server (fixed newstyle only) exporting one BlockDevice over TCP and/or unix sockets.
 * Requests on a connection are parsed as they arrive and served concurrently; replies go out
 * in completion order.
 */
import net from 'node:net';
import fs from 'node:fs';
import tls from 'node:tls';
import v8 from 'node:v8';
import vm from 'node:vm';
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
  NBD_EPERM,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_C_KNOWN,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_READ_ONLY,
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
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REPLY_FLAG_DONE,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_TLS_REQD,
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
import type { ServerTls } from './tls.js';

export interface NbdServerOptions {
  device: BlockDevice;
  /** Name of the single export; '' (the default export) is also accepted for it. */
  exportName?: string;
  description?: string;
  /** Largest READ/WRITE length accepted, advertised as the maximum block size. Default 32 MiB. */
  maxBlock?: number;
  log?: (msg: string) => void;
  /** Advertise NBD_FLAG_READ_ONLY and refuse WRITE, TRIM and WRITE_ZEROES with EPERM. */
  readOnly?: boolean;
  /** Connections at once, handshaking ones included (default 64). */
  maxConnections?: number;
  /** A client still negotiating options (TLS included) this long after connecting is dropped (default 10 s). */
  handshakeTimeoutMs?: number;
  /**
   * Bytes a connection may hold: replies queued for a client that does not read them, plus
   * requests being served. Beyond it the server stops reading that client's requests until
   * they drain (default 64 MiB; the request that crosses it is served, so up to one maxBlock more).
   */
  connectionQueueBytes?: number;
  /**
   * The same across all connections (default 256 MiB). Past it only connections holding
   * nothing take a request, until 1.5 times it; so the total stays below 1.5 times this plus
   * one maxBlock.
   */
  totalQueueBytes?: number;
  /**
   * While some connection waits for room in the shared budget, a connection whose queued
   * replies have not moved for this long is dropped: it is not reading, and what it holds is
   * what the others wait for (default 15 s).
   */
  stalledReplyTimeoutMs?: number;
  /** NBD_OPT_STARTTLS support; null or absent: no TLS. */
  tls?: ServerTls | null;
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
  /** Connections closed at once because maxConnections were open. */
  connectionsRefused: number;
  /** Connections dropped to make room: the oldest of those still handshaking after a grace time. */
  connectionsEvicted: number;
  /** Connections dropped for not finishing the handshake within handshakeTimeoutMs. */
  handshakeTimeouts: number;
  /** Connections dropped for not reading their replies while others waited for room. */
  stalledDropped: number;
  /** Connections that completed STARTTLS. */
  tlsConnections: number;
  /** Bytes held now for replies not yet sent and requests being served, all connections. */
  queuedBytes: number;
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
export const DEFAULT_CONNECTION_QUEUE_BYTES = 64 * 1024 * 1024;
export const DEFAULT_TOTAL_QUEUE_BYTES = 256 * 1024 * 1024;
export const DEFAULT_MAX_CONNECTIONS = 64;
export const DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000;
export const DEFAULT_STALLED_REPLY_TIMEOUT_MS = 15_000;
/**
 * At the connection limit, a handshaking connection at least this old is dropped for a new
 * one, so a crowd of silent sockets cannot keep real clients out until their timeout.
 */
const EVICT_AFTER_MS = 1000;
/**
 * A connection that held at least this much when it closed triggers a full garbage collection
 * a moment later: its reply buffers are garbage then, but an idle server allocates nothing, so
 * V8 would never collect them and the memory would stay taken after the client left.
 */
const RECLAIM_AFTER_BYTES = 16 * 1024 * 1024;
const RECLAIM_DELAY_MS = 1000;

let collectGarbage: (() => void) | null | undefined;

/** gc() without --expose-gc: the flag takes effect for contexts created after it is set. */
function fullGc(): void {
  if (collectGarbage === undefined) {
    try {
      v8.setFlagsFromString('--expose-gc');
      collectGarbage = vm.runInNewContext('gc') as () => void;
    } catch {
      collectGarbage = null;
    }
  }
  collectGarbage?.();
}

/** Refused connections are logged at most once per this interval. */
const REFUSAL_LOG_INTERVAL_MS = 5000;
/** How long a graceful close waits for the peer to close its side before destroying. */
const LINGER_MS = 2000;

const TRANSMISSION_FLAGS =
  NBD_FLAG_HAS_FLAGS |
  NBD_FLAG_SEND_FLUSH |
  NBD_FLAG_SEND_FUA |
  NBD_FLAG_SEND_TRIM |
  NBD_FLAG_SEND_WRITE_ZEROES |
  NBD_FLAG_CAN_MULTI_CONN;
/** Flush stays: a read-only client may still ask that what it read be stable. */
const READ_ONLY_FLAGS = NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_FLUSH | NBD_FLAG_CAN_MULTI_CONN;

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
  readOnly: boolean;
  handshakeTimeoutMs: number;
  connectionQueueBytes: number;
  totalQueueBytes: number;
  tls: ServerTls | null;
  log: (msg: string) => void;
  observer: NbdServerObserver | undefined;
  stats: NbdServerStats;
  closing: boolean;
  /** Device calls not yet settled, across all connections. */
  deviceCalls: Set<Promise<unknown>>;
  /** Connections that stopped reading while the total was over totalQueueBytes. */
  waitingForRoom: Set<Connection>;
  /** Called when a connection that held a lot of memory closed. */
  reclaimSoon: () => void;
  /** Called when a connection starts waiting for room: look for stalled ones to drop. */
  watchStalled: () => void;
}

function positiveInteger(name: string, value: number | undefined, fallback: number): number {
  const v = value ?? fallback;
  if (!Number.isSafeInteger(v) || v <= 0) throw new RangeError(`${name} must be a positive integer, not ${v}`);
  return v;
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
  let reclaimTimer: NodeJS.Timeout | null = null;
  let stallTimer: NodeJS.Timeout | null = null;
  const stalledReplyTimeoutMs = positiveInteger('stalledReplyTimeoutMs', opts.stalledReplyTimeoutMs, DEFAULT_STALLED_REPLY_TIMEOUT_MS);
  const maxConnections = positiveInteger('maxConnections', opts.maxConnections, DEFAULT_MAX_CONNECTIONS);
  const shared: Shared = {
    device: opts.device,
    exportName,
    description: opts.description,
    maxBlock,
    readOnly: opts.readOnly === true,
    handshakeTimeoutMs: positiveInteger('handshakeTimeoutMs', opts.handshakeTimeoutMs, DEFAULT_HANDSHAKE_TIMEOUT_MS),
    connectionQueueBytes: positiveInteger('connectionQueueBytes', opts.connectionQueueBytes, DEFAULT_CONNECTION_QUEUE_BYTES),
    totalQueueBytes: positiveInteger('totalQueueBytes', opts.totalQueueBytes, DEFAULT_TOTAL_QUEUE_BYTES),
    tls: opts.tls ?? null,
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
      connectionsRefused: 0,
      connectionsEvicted: 0,
      handshakeTimeouts: 0,
      stalledDropped: 0,
      tlsConnections: 0,
      queuedBytes: 0,
    },
    closing: false,
    deviceCalls: new Set(),
    waitingForRoom: new Set(),
    reclaimSoon: () => {
      if (reclaimTimer) clearTimeout(reclaimTimer);
      reclaimTimer = setTimeout(() => {
        reclaimTimer = null;
        fullGc();
      }, RECLAIM_DELAY_MS);
      reclaimTimer.unref();
    },
    watchStalled: () => {
      if (stallTimer) return;
      stallTimer = setInterval(() => {
        if (shared.waitingForRoom.size === 0 || shared.closing) {
          clearInterval(stallTimer!);
          stallTimer = null;
          return;
        }
        const now = Date.now();
        for (const conn of connections) {
          if (conn.repliesStalledFor(now) >= stalledReplyTimeoutMs) {
            shared.stats.stalledDropped++;
            conn.evict(`replies unread for ${stalledReplyTimeoutMs} ms while other clients wait for memory; dropped`);
          }
        }
      }, Math.min(1000, stalledReplyTimeoutMs));
      stallTimer.unref();
    },
  };
  const listeners: net.Server[] = [];
  const connections = new Set<Connection>();
  let closePromise: Promise<void> | null = null;
  let refusalsUnlogged = 0;
  let refusalLoggedAt = 0;

  /** At the limit: drop the oldest connection still handshaking after the grace time, if any. */
  const makeRoom = (): boolean => {
    const now = Date.now();
    for (const conn of connections) {
      if (conn.handshakingSince(now) >= EVICT_AFTER_MS) {
        shared.stats.connectionsEvicted++;
        conn.evict('dropped to make room for a new connection: still handshaking at the connection limit');
        connections.delete(conn);
        return true;
      }
    }
    return false;
  };

  const refuse = (socket: net.Socket): void => {
    shared.stats.connectionsRefused++;
    refusalsUnlogged++;
    const now = Date.now();
    if (now - refusalLoggedAt >= REFUSAL_LOG_INTERVAL_MS) {
      log(`connection limit ${maxConnections} reached: refused ${refusalsUnlogged} connection(s)`);
      refusalsUnlogged = 0;
      refusalLoggedAt = now;
    }
    socket.on('error', () => {});
    socket.destroy();
  };

  const onConnection = (socket: net.Socket): void => {
    if (shared.closing) {
      socket.destroy();
      return;
    }
    if (connections.size >= maxConnections && !makeRoom()) {
      refuse(socket);
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
  private lingerTimer: NodeJS.Timeout | null = null;
  /** Reply bytes handed to the socket and not yet written out to the kernel. */
  private unsentBytes = 0;
  /** Size of the WRITE payload being received (its buffer is allocated whole). */
  private receivingBytes = 0;
  private peakHeld = 0;
  /** When a queued reply last went out, or when the queue last went from empty to not. */
  private lastSentAt = 0;
  private readonly connectedAt = Date.now();
  private handshakeTimer: NodeJS.Timeout | null;
  /** Replaced by the TLS socket after STARTTLS. */
  private socket: net.Socket;
  private secure = false;

  constructor(
    socket: net.Socket,
    private readonly shared: Shared,
  ) {
    this.socket = socket;
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
    this.peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
    shared.stats.connectionsTotal++;
    shared.stats.connectionsActive++;
    if (socket.remoteAddress) socket.setNoDelay(true);
    this.listen(socket);
    this.handshakeTimer = setTimeout(() => {
      this.handshakeTimer = null;
      if (this.phase !== 'handshake') return;
      this.shared.stats.handshakeTimeouts++;
      this.evict(`handshake not finished within ${this.shared.handshakeTimeoutMs} ms; dropped`);
    }, shared.handshakeTimeoutMs);
    this.handshakeTimer.unref();
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

  private listen(socket: net.Socket): void {
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('end', () => this.onEnd());
    socket.on('error', (err: NodeJS.ErrnoException) => {
      // EPIPE/ECONNRESET are routine when a client goes away; 'close' follows.
      this.shared.log(`${this.peer}: socket error: ${err.code ?? err.message}`);
    });
    socket.on('close', () => this.onClose());
  }

  /** How long this connection has been handshaking, or -1 once past the handshake. */
  handshakingSince(now: number): number {
    return this.phase === 'handshake' ? now - this.connectedAt : -1;
  }

  /** How long queued replies have waited without a byte of them going out, or -1. */
  repliesStalledFor(now: number): number {
    return this.phase === 'transmission' && this.unsentBytes > 0 ? now - this.lastSentAt : -1;
  }

  /** Drops the connection at once; device calls in flight still settle (server.close waits for them). */
  evict(reason: string): void {
    if (this.phase === 'closed') return;
    this.shared.log(`${this.peer}: ${reason}`);
    this.socket.destroy();
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
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    if (this.peakHeld >= RECLAIM_AFTER_BYTES) this.shared.reclaimSoon();
    // Replies never sent are dropped with the socket; write callbacks after this are ignored.
    this.releaseSent(this.unsentBytes);
    this.dropReceiving();
    this.shared.waitingForRoom.delete(this);
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
      if (this.shared.tls?.mode === 'require' && !this.secure && opt.option !== NBD_OPT_STARTTLS && opt.option !== NBD_OPT_ABORT) {
        if (opt.option === NBD_OPT_EXPORT_NAME) {
          // EXPORT_NAME cannot carry an error reply; proto.md has the server hang up.
          this.shared.log(`${this.peer}: EXPORT_NAME without TLS while TLS is required`);
          this.endGracefully();
          return false;
        }
        this.replyOption(opt.option, NBD_REP_ERR_TLS_REQD, 'TLS is required: send NBD_OPT_STARTTLS first');
        continue;
      }
      switch (opt.option) {
        case NBD_OPT_STARTTLS:
          if (!this.shared.tls) {
            this.replyOption(opt.option, NBD_REP_ERR_UNSUP, 'TLS is not configured on this server');
            break;
          }
          if (data.length !== 0) {
            this.replyOption(opt.option, NBD_REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
            break;
          }
          if (this.secure) {
            this.replyOption(opt.option, NBD_REP_ERR_INVALID, 'TLS is already negotiated');
            break;
          }
          if (this.queue.length > 0) throw new HandshakeAbort('data sent after NBD_OPT_STARTTLS before its reply');
          this.replyOption(opt.option, NBD_REP_ACK);
          await this.startTls(this.shared.tls);
          // proto.md: whatever was negotiated in clear text is forgotten.
          this.structured = false;
          break;
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
          // Meta contexts, extended headers and anything unknown.
          this.replyOption(opt.option, NBD_REP_ERR_UNSUP, `option ${optionName(opt.option)} not supported`);
          break;
      }
    }
  }

  private knownExport(name: string): boolean {
    return name === this.shared.exportName || name === '';
  }

  private transmissionFlags(): number {
    const base = this.shared.readOnly ? READ_ONLY_FLAGS : TRANSMISSION_FLAGS;
    // Reads are always answered with a single data chunk, so DF costs nothing to honour;
    // proto.md forbids the flag without structured replies.
    return this.structured ? base | NBD_FLAG_SEND_DF : base;
  }

  /**
   * Wraps the socket in TLS right after the ACK is queued, in the same tick: the client sends
   * its ClientHello only after reading the ACK, so no byte of it can reach the clear-text reader.
   */
  private startTls(config: ServerTls): Promise<void> {
    const raw = this.socket;
    if (this.corked) {
      this.corked = false;
      raw.uncork();
    }
    raw.removeAllListeners('data');
    raw.removeAllListeners('end');
    raw.removeAllListeners('close');
    raw.removeAllListeners('error');
    raw.on('error', () => {});
    const secure = new tls.TLSSocket(raw, config.socketOptions());
    this.socket = secure;
    this.listen(secure);
    return new Promise((resolve, reject) => {
      const onSecure = (): void => {
        secure.off('error', onError);
        this.secure = true;
        this.shared.stats.tlsConnections++;
        this.shared.log(`${this.peer}: TLS ${secure.getProtocol() ?? ''} ${secure.getCipher()?.name ?? ''}`);
        resolve();
      };
      const onError = (err: Error): void => {
        secure.off('secure', onSecure);
        reject(new HandshakeAbort(`TLS handshake failed: ${err.message}`));
      };
      secure.once('secure', onSecure);
      secure.once('error', onError);
    });
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
    if (this.handshakeTimer) {
      clearTimeout(this.handshakeTimer);
      this.handshakeTimer = null;
    }
    this.shared.log(`${this.peer}: transmission (structured replies: ${this.structured}${this.secure ? ', TLS' : ''})`);
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
        }
        if (this.shared.stats.queuedBytes >= this.shared.totalQueueBytes) {
          this.shared.waitingForRoom.add(this);
          this.shared.watchStalled();
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
        // Handed over to dispatch, which holds it again while the device writes it.
        this.shared.stats.queuedBytes -= this.receivingBytes;
        this.receivingBytes = 0;
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
            this.receivingBytes = req.length;
            this.hold(req.length);
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
    if (this.inflight >= MAX_INFLIGHT_REQUESTS) return true;
    const held = this.inflightBytes + this.unsentBytes + this.receivingBytes;
    if (held >= this.shared.connectionQueueBytes) return true;
    const total = this.shared.stats.queuedBytes;
    if (total < this.shared.totalQueueBytes) return false;
    // Over the shared budget, a connection holding nothing may still take one request from a
    // reserve of half the budget: clients that never read their replies fill the budget, and
    // without the reserve they would starve everyone else. The reserve keeps the total bounded.
    return held > 0 || total >= this.shared.totalQueueBytes * 1.5;
  }

  maybeResume(): void {
    if (!this.paused || this.phase !== 'transmission' || this.overloaded()) return;
    this.paused = false;
    this.shared.waitingForRoom.delete(this);
    this.socket.resume();
    this.processRequests();
  }

  /** Bytes this connection holds (replies unsent, requests being served) go up or down. */
  private hold(bytes: number): void {
    this.shared.stats.queuedBytes += bytes;
    const held = this.inflightBytes + this.unsentBytes + this.receivingBytes;
    if (held > this.peakHeld) this.peakHeld = held;
  }

  private dropReceiving(): void {
    const bytes = this.receivingBytes;
    this.receivingBytes = 0;
    if (bytes > 0) this.release(bytes);
  }

  private releaseSent(bytes: number): void {
    if (bytes === 0) return;
    this.unsentBytes -= bytes;
    this.release(bytes);
  }

  private release(bytes: number): void {
    const shared = this.shared;
    shared.stats.queuedBytes -= bytes;
    if (this.paused) this.maybeResume();
    if (shared.waitingForRoom.size > 0 && shared.stats.queuedBytes < shared.totalQueueBytes) {
      for (const conn of [...shared.waitingForRoom]) conn.maybeResume();
    }
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
        if (this.shared.readOnly) return this.replyError(req, NBD_EPERM, 'the export is read-only');
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
        if (this.shared.readOnly) return this.replyError(req, NBD_EPERM, 'the export is read-only');
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
    this.hold(bytes);
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
    this.release(bytes);
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
    const bytes = a.length + (b ? b.length : 0);
    this.unsentBytes += bytes;
    this.hold(bytes);
    if (this.unsentBytes === bytes) this.lastSentAt = Date.now();
    // Also called (with an error) for writes a destroyed socket dropped; once onClose has
    // released everything, which `this.phase` tells, there is nothing left to release.
    const sent = (): void => {
      if (this.phase === 'closed') return;
      this.lastSentAt = Date.now();
      this.releaseSent(bytes);
    };
    if (b && b.length > 0) {
      s.write(a);
      s.write(b, sent);
    } else {
      s.write(a, sent);
    }
  }

  // ------------------------------------------------------------------------------------------
  // Shutdown

  /** Stops taking requests; once the in-flight ones have replied, closes the socket. */
  private stopAndDrain(): void {
    if (this.phase === 'closed' || this.phase === 'closing') return;
    this.phase = 'closing';
    this.pendingWrite = null;
    this.payload = null;
    this.dropReceiving();
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
