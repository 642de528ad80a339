import { promises as fsp } from 'node:fs';
import { resolve as resolvePath } from 'node:path';
import type { BackingDevice } from '../backing/backing.js';
import { openBacking } from '../backing/open.js';
import { Cache } from '../cache/cache.js';
import { isBlank } from '../cache/meta.js';
import { statusFields } from '../cache/status.js';
import { formatPosition } from '../format/index.js';
import { openFileMedium, type FileMedium } from '../media/file.js';
import { SPARSE_RISK } from '../media/space.js';
import { createLogger, LOG_LEVELS, parseLogLevel, type LogFormat, type Logger, type LogLevel } from '../log.js';
import { createNbdServer, DEFAULT_HANDSHAKE_TIMEOUT_MS, DEFAULT_MAX_CONNECTIONS, type NbdServer, type NbdServerObserver } from '../nbd/server.js';
import { loadServerTls, TlsConfigError, type ServerTls, type TlsMode } from '../nbd/tls.js';
import { parseArgs, parseHostPort, parseIntOption, parseSizeOption } from './args.js';
import { processIo, type CliIo, type Command } from './command.js';
import { listenPrivately, parseSocketAccess, startControlServer, type ControlRequest, type ControlResult, type SocketAccess } from './control.js';
import { CliError, UsageError } from './errors.js';
import { expandConfig } from './serve-config.js';
import { parseMessage, parseTableOptions, type TableOptions } from './table.js';

const GiB = 1024 ** 3;
export const DEFAULT_DIR = 'pcache-data';
export const DEFAULT_CACHE_SIZE = 1 * GiB;
export const DEFAULT_BACKING_SIZE = 4 * GiB;
const DEFAULT_PORT = 10809;

const HELP = `usage: pcache serve [<cache-dev> <backing-dev> [<n> [cache_mode writeback] [data_crc true|false]]]
                    [--listen HOST:PORT | --socket PATH] [--export NAME] [--sparse]
                    [--socket-mode MODE] [--socket-group GROUP] [--read-only]
                    [--tls off|on|require] [--tls-psk FILE] [--tls-certificates DIR]
                    [--max-connections N] [--handshake-timeout S]
                    [--metrics HOST:PORT] [--log-level LEVEL] [--log-format text|json]
       pcache serve --config FILE [options]

Serve <backing-dev> cached by <cache-dev> over NBD. The options after the devices are
dm-pcache's table options, word for word. With no devices, serve an embedded default:
./${DEFAULT_DIR}/cache.img (1 GiB) in front of ./${DEFAULT_DIR}/backing.img (4 GiB, sparse),
created when missing. <backing-dev> is a file, a block device or an NBD export
(nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH), reconnected if the connection drops.

  --listen HOST:PORT  TCP address (default 127.0.0.1:${DEFAULT_PORT})
  --socket PATH       listen on a unix socket instead
  --export NAME       export name (default: the empty default export)
  --sparse            on first start, leave a blank cache file sparse instead of allocating
                      all its blocks (fallocate); the risk: ${SPARSE_RISK}
  --socket-mode MODE  mode of the unix sockets (control, and --socket's): default 0600,
                      owner only, whatever the umask; e.g. 0660 with --socket-group
  --socket-group GROUP  group of the unix sockets (a name or a number)
  --read-only         clients may only read (writes, trims and zeroing fail with EPERM);
                      the cache still replays and writes back what it holds
  --max-connections N clients at once, handshaking ones included (default ${DEFAULT_MAX_CONNECTIONS})
  --handshake-timeout S  drop a client that has not finished negotiating after S seconds
                      (default ${DEFAULT_HANDSHAKE_TIMEOUT_MS / 1000})
  --tls off|on|require  NBD STARTTLS: on offers it, require refuses clients without it
                      (default off; on/require need one of the two below)
  --tls-psk FILE      pre-shared keys, username:hexkey lines (nbdkit's and psktool's format)
  --tls-certificates DIR  X.509: DIR/server-cert.pem, DIR/server-key.pem (DIR/ca-cert.pem)
  --metrics HOST:PORT serve Prometheus metrics at http://HOST:PORT/metrics
  --log-level LEVEL   ${LOG_LEVELS.join(', ')} (default info; debug adds client connects)
  --log-format F      text (default) or json: one JSON object a line, for log collectors
  --config FILE       read the devices and options from FILE, one 'key = value' a line:
                      cache-dev, backing-dev, table (dm-pcache's options), and the long
                      options above without their dashes (see contrib/pcache.conf.example)
  --sequential-cutoff BYTES
                      read streams longer than this (e.g. 4M) are not filled into the
                      cache; 0 turns the cutoff off (default 4M; a pcache extension, also
                      set at run time with: pcache message <cache-dev> sequential_cutoff N)

A cache device is owned by one pcache at a time: an OS lock on the open device (a loop device's
file too) refuses a second server or tool on it, by whatever path, hard link or runtime
directory; a file or block device as backing device is claimed the same way.

Clients over TLS: nbds://HOST:PORT/EXPORT?tls-psk-file=FILE&tls-username=USER (libnbd).
A TCP address other than loopback without --tls require gets a warning: anyone who can reach
it can read and write the device.
`;

const SPEC = {
  listen: { type: 'string', value: 'HOST:PORT' },
  socket: { type: 'string', value: 'PATH' },
  export: { type: 'string', value: 'NAME' },
  sparse: { type: 'boolean' },
  'socket-mode': { type: 'string', value: 'MODE' },
  'socket-group': { type: 'string', value: 'GROUP' },
  'read-only': { type: 'boolean' },
  'max-connections': { type: 'string', value: 'N' },
  'handshake-timeout': { type: 'string', value: 'S' },
  tls: { type: 'string', value: 'off|on|require' },
  'tls-psk': { type: 'string', value: 'FILE' },
  'tls-certificates': { type: 'string', value: 'DIR' },
  metrics: { type: 'string', value: 'HOST:PORT' },
  'log-level': { type: 'string', value: 'LEVEL' },
  'log-format': { type: 'string', value: 'text|json' },
  config: { type: 'string', value: 'FILE' },
  'sequential-cutoff': { type: 'string', value: 'BYTES' },
} as const;

export interface ServeConfig {
  cacheDev: string;
  backingDev: string;
  table: TableOptions;
  embedded: boolean;
  listen: { host: string; port: number } | null;
  socket: string | null;
  exportName: string;
  /** Leave a blank cache file sparse on first start. */
  sparse: boolean;
  socketAccess: SocketAccess;
  readOnly: boolean;
  maxConnections: number;
  handshakeTimeoutMs: number;
  tls: { mode: TlsMode; pskFile?: string; certificatesDir?: string };
  metrics: { host: string; port: number } | null;
  logLevel: LogLevel;
  logFormat: LogFormat;
  /** Undefined: the engine's default. */
  sequentialCutoff: number | undefined;
}

function parseTlsMode(text: string | undefined): TlsMode {
  if (text === undefined) return 'off';
  if (text === 'off' || text === 'on' || text === 'require') return text;
  throw new UsageError(`--tls takes off, on or require, not '${text}'`);
}

function parseSeconds(name: string, text: string): number {
  const n = Number(text);
  if (!/^\d+(\.\d+)?$/.test(text.trim()) || !(n > 0) || n > 86400) throw new UsageError(`--${name} takes seconds (more than 0, at most 86400), not '${text}'`);
  return Math.round(n * 1000);
}

/**
 * libuv's thread pool size as this process started it: UV_THREADPOOL_SIZE when set (libuv clamps
 * it to 1..1024), else libuv's default of 4. bin/pcache.js sets 16 before the pool exists; stats
 * reports the figure so a server started some other way (with the default 4) is visible.
 */
function threadpoolSize(env: NodeJS.ProcessEnv): number {
  const n = Number.parseInt(env.UV_THREADPOOL_SIZE ?? '', 10);
  return Number.isFinite(n) && n > 0 ? Math.min(n, 1024) : 4;
}

function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\./.test(host) || /^::ffff:127\./i.test(host);
}

/** Everything about the command line is checked here, before any device is touched. */
export function parseServeArgs(argv: readonly string[]): ServeConfig {
  const { options, positionals, help } = parseArgs(expandConfig(argv, SPEC), SPEC, { min: 0, max: Infinity, names: '<cache-dev> <backing-dev>' });
  if (help) throw new UsageError('--help is handled by the command');
  if (positionals.length === 1) throw new UsageError('missing <backing-dev>');
  const table = parseTableOptions(positionals.slice(2));
  if (options.listen !== undefined && options.socket !== undefined) throw new UsageError('--listen and --socket exclude each other');
  const embedded = positionals.length === 0;
  const logLevel = parseLogLevel(options['log-level'] ?? 'info');
  if (!logLevel) throw new UsageError(`--log-level must be one of ${LOG_LEVELS.join(', ')}, not '${options['log-level']}'`);
  const logFormat = options['log-format'] ?? 'text';
  if (logFormat !== 'text' && logFormat !== 'json') throw new UsageError(`--log-format must be text or json, not '${logFormat}'`);
  return {
    cacheDev: embedded ? `${DEFAULT_DIR}/cache.img` : positionals[0]!,
    backingDev: embedded ? `${DEFAULT_DIR}/backing.img` : positionals[1]!,
    table,
    embedded,
    listen: options.socket !== undefined ? null : parseHostPort('listen', options.listen ?? `127.0.0.1:${DEFAULT_PORT}`, '127.0.0.1'),
    socket: options.socket ?? null,
    exportName: options.export ?? '',
    sparse: options.sparse === true,
    socketAccess: parseSocketAccess(options['socket-mode'], options['socket-group']),
    readOnly: options['read-only'] === true,
    maxConnections: options['max-connections'] === undefined ? DEFAULT_MAX_CONNECTIONS : parseIntOption('max-connections', options['max-connections'], 1, 65536),
    handshakeTimeoutMs: options['handshake-timeout'] === undefined ? DEFAULT_HANDSHAKE_TIMEOUT_MS : parseSeconds('handshake-timeout', options['handshake-timeout']),
    tls: {
      mode: parseTlsMode(options.tls),
      ...(options['tls-psk'] !== undefined ? { pskFile: options['tls-psk'] } : {}),
      ...(options['tls-certificates'] !== undefined ? { certificatesDir: options['tls-certificates'] } : {}),
    },
    metrics: options.metrics === undefined ? null : parseHostPort('metrics', options.metrics, '127.0.0.1'),
    logLevel,
    logFormat,
    sequentialCutoff: options['sequential-cutoff'] === undefined ? undefined : parseSizeOption('sequential-cutoff', options['sequential-cutoff']),
  };
}

async function ensureSparse(path: string, size: number): Promise<boolean> {
  try {
    await fsp.stat(path);
    return false;
  } catch {
    await fsp.mkdir(resolvePath(path, '..'), { recursive: true });
    const fh = await fsp.open(path, 'wx');
    try {
      await fh.truncate(size);
    } finally {
      await fh.close();
    }
    return true;
  }
}

function tableLine(cfg: ServeConfig, cache: Cache): string {
  const sectors = Math.floor(cache.size() / 512);
  return `0 ${sectors} pcache ${cfg.cacheDev} ${cfg.backingDev} 4 cache_mode ${cfg.table.cacheMode} crc ${cache.status().dataCrc}`;
}

function statusLine(cache: Cache): string {
  return `0 ${Math.floor(cache.size() / 512)} pcache ${statusFields(cache.status())}`;
}

function connectHelp(cfg: ServeConfig, addr: string, uri: string): string {
  return [
    `pcache: serving ${cfg.backingDev} cached by ${cfg.cacheDev} on ${addr}`,
    `  nbdinfo ${uri}`,
    `  nbdfuse /tmp/pcache-mnt/disk ${uri} &   (then losetup or mount the file)`,
    cfg.socket ? `  nbd-client -unix ${cfg.socket} /dev/nbd0 -N '${cfg.exportName}'` : `  nbd-client ${cfg.listen!.host} ${cfg.listen!.port} /dev/nbd0 -N '${cfg.exportName}'`,
    `  qemu-img info ${uri}`,
    `  pcache status ${cfg.cacheDev}    pcache stop ${cfg.cacheDev}`,
    '',
  ].join('\n');
}

/** A running server: the cache, the NBD listener and the control socket, and their shutdown. */
export async function serve(cfg: ServeConfig, io: CliIo): Promise<{ stopped: Promise<number>; stop(force: boolean): void; uri: string }> {
  const logger = createLogger({ level: cfg.logLevel, format: cfg.logFormat, write: (line) => io.err(line) });
  let tls: ServerTls | null;
  try {
    tls = loadServerTls(cfg.tls);
  } catch (err) {
    throw err instanceof TlsConfigError ? new CliError(err.message) : err;
  }
  if (cfg.embedded) {
    const made = [await ensureSparse(cfg.cacheDev, DEFAULT_CACHE_SIZE), await ensureSparse(cfg.backingDev, DEFAULT_BACKING_SIZE)];
    if (made.some(Boolean)) logger.info('create', `created ${DEFAULT_DIR}/cache.img (1 GiB) and ${DEFAULT_DIR}/backing.img (4 GiB, sparse)`);
  }
  let medium: FileMedium | undefined;
  let backing: BackingDevice | undefined;
  let cache: Cache | undefined;
  let nbd: NbdServer | undefined;
  let control: { close(): Promise<void> } | undefined;
  let metrics: ServeMetrics | undefined;
  // The control socket goes last: once it is gone, the device lock is free for the next server.
  const release = async (): Promise<void> => {
    await backing?.close().catch(() => undefined);
    await medium?.close().catch(() => undefined);
    await control?.close().catch(() => undefined);
    await metrics?.close().catch(() => undefined);
  };
  try {
    try {
      await fsp.stat(cfg.cacheDev);
    } catch {
      throw new CliError(`cache device ${cfg.cacheDev} does not exist`);
    }
    medium = await openFileMedium(cfg.cacheDev);
    backing = await openBacking(cfg.backingDev, { nbd: { log: (m) => logger.warn('backing', m) } });
    // First start formats a blank device: a cache file gets all its blocks first (see --sparse).
    if (!cfg.sparse && !medium.isBlockDevice && (await isBlank(medium))) await medium.allocate();
    const replayStarted = process.hrtime.bigint();
    cache = await Cache.open(medium, backing, { dataCrc: cfg.table.dataCrc, cacheMode: cfg.table.cacheMode, sequentialCutoff: cfg.sequentialCutoff, logger });
    logReplay(logger, cache, Number(process.hrtime.bigint() - replayStarted) / 1e9);
    const observers: NbdServerObserver[] = [requestLogObserver(logger)];
    if (cfg.metrics) {
      metrics = await startServeMetrics(cfg.metrics, cache, backing, logger);
      observers.push(metrics.observer);
    }
    nbd = createNbdServer({
      device: cache,
      exportName: cfg.exportName,
      description: `pcache: ${cfg.backingDev} cached by ${cfg.cacheDev}`,
      readOnly: cfg.readOnly,
      maxConnections: cfg.maxConnections,
      handshakeTimeoutMs: cfg.handshakeTimeoutMs,
      tls,
      // Connects and disconnects are logged from the observer, with their fields; not twice.
      log: (m) => void (/: (connected|closed)$/.test(m) || logger.debug('nbd', m)),
      observer: combineObservers(observers),
    });
    metrics?.attach(nbd);
  } catch (err) {
    await cache?.close().catch(() => undefined);
    await release();
    throw err instanceof CliError ? err : new CliError(err instanceof Error ? err.message : String(err));
  }
  const theMetrics = metrics;
  const theCache = cache;
  const theNbd = nbd;
  const theBacking = backing;
  let resolveStopped!: (code: number) => void;
  const stopped = new Promise<number>((r) => (resolveStopped = r));
  let stopping: Promise<void> | null = null;
  const stop = (force: boolean): Promise<void> => {
    if (stopping && !force) return stopping;
    logger.info('stop', force ? 'stopping at once (forced)' : 'stopping: finishing requests in flight, writing the open log', { force });
    const stopStarted = Date.now();
    const run = (async () => {
      clearInterval(spaceWatch);
      if (force) {
        // Everything a client saw flushed is durable already; write what is open, briefly.
        await theNbd.close({ force: true }).catch(() => undefined);
        await Promise.race([theCache.close().catch(() => undefined), new Promise((r) => setTimeout(r, 2000))]);
      } else {
        await theNbd.close().catch(() => undefined);
        await theCache.close().catch((e) => logger.error('stop', 'closing the cache failed', { error: e instanceof Error ? e.message : String(e) }));
      }
      const dirtyBytes = theCache.status().dirtyBytes;
      await release();
      logger.info('stopped', 'stopped', { seconds: (Date.now() - stopStarted) / 1000, dirtyBytes });
      resolveStopped(0);
    })();
    stopping = run;
    return run;
  };

  const spaceWatch = watchSpaceWaits(logger, theCache);
  const poolThreads = threadpoolSize(process.env);
  const handle = async (req: ControlRequest, progress: (d: unknown) => void): Promise<ControlResult> => {
    switch (req.cmd) {
      case 'status':
        return { type: 'result', ok: true, output: statusLine(theCache) };
      case 'table':
        return { type: 'result', ok: true, output: tableLine(cfg, theCache) };
      case 'stats':
        return { type: 'result', ok: true, data: { ...theCache.status(), threadpoolSize: poolThreads, nbd: theNbd.stats(), ...(theBacking.state ? { backing: theBacking.state() } : {}) } };
      case 'message': {
        const m = parseMessage(req.args);
        if (m === null) return { type: 'result', ok: false, error: 'Invalid argument' };
        if (m.name === 'gc_percent') await theCache.setGcPercent(m.value);
        else theCache.setSequentialCutoff(m.value);
        return { type: 'result', ok: true, output: '' };
      }
      case 'flush':
        await theCache.drain({
          onProgress: (s) =>
            progress({
              dirtyBytes: s.dirtyBytes,
              dirtyTail: s.dirtyTail,
              keyHead: s.keyHead,
              writtenBack: s.counters.writtenBackBytes,
              writebackError: s.writebackError,
              writebackErrors: s.counters.writebackErrors,
            }),
        });
        return { type: 'result', ok: true, output: statusLine(theCache) };
      case 'stop':
        setImmediate(() => void stop(req.args.includes('--force')));
        return { type: 'result', ok: true, output: '' };
      default:
        return { type: 'result', ok: false, error: `unknown control command ${req.cmd}` };
    }
  };

  let addr: string;
  let uri: string;
  try {
    control = await startControlServer(cfg.cacheDev, handle, cfg.socketAccess);
    if (cfg.socket) {
      const socket = cfg.socket;
      await listenPrivately(socket, cfg.socketAccess, () => theNbd.listenUnix(socket));
      addr = cfg.socket;
      uri = `${tls?.mode === 'require' ? 'nbds' : 'nbd'}+unix:///${cfg.exportName}?socket=${resolvePath(cfg.socket)}`;
    } else {
      const a = await theNbd.listenTcp(cfg.listen!.host, cfg.listen!.port);
      addr = `${a.host}:${a.port}`;
      const host = a.host.includes(':') ? `[${a.host}]` : a.host;
      uri = `${tls?.mode === 'require' ? 'nbds' : 'nbd'}://${host}:${a.port}/${cfg.exportName}`;
      if (!isLoopback(a.host) && tls?.mode !== 'require') {
        io.err(
          `pcache: warning: listening on ${addr} ${tls ? 'with TLS optional (--tls on)' : 'without TLS'}: anyone who can reach it can ` +
            `${cfg.readOnly ? 'read' : 'read and write'} the device; use --tls require with --tls-psk or --tls-certificates\n`,
        );
      }
    }
  } catch (err) {
    clearInterval(spaceWatch);
    await theNbd.close({ force: true }).catch(() => undefined);
    await theCache.close().catch(() => undefined);
    await release();
    throw new CliError(err instanceof Error ? err.message : String(err));
  }
  logStart(logger, cfg, theCache, theBacking, { addr, uri, metrics: theMetrics ? `http://${theMetrics.address}/metrics` : undefined });
  // A person at a terminal gets the ways to connect; a service's log gets the start line only.
  if (cfg.logFormat === 'text' && io === processIo && process.stderr.isTTY) io.err(connectHelp(cfg, addr, uri));
  io.out(statusLine(theCache) + '\n');
  return { stopped, stop: (force) => void stop(force), uri };
}

export const command: Command = {
  summary: 'serve a backing device cached by a cache device over NBD',
  help: HELP,
  async run(argv, io) {
    if (argv.includes('--help') || argv.includes('-h')) {
      io.out(HELP);
      return 0;
    }
    const cfg = parseServeArgs(argv);
    const server = await serve(cfg, io);
    let signals = 0;
    const onSignal = (): void => {
      signals++;
      // A second signal means the user will not wait: stop at once, keeping what was flushed.
      server.stop(signals > 1);
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
    const code = await server.stopped;
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    return code;
  },
};

// ---------------------------------------------------------------------------------------------
// Logs and metrics of a running server (issue 15): what serve() reports, kept apart from how it
// runs.

const MiB = 2 ** 20;
/** How often space waits are summed into one log line. */
const SPACE_WAIT_LOG_MS = 10_000;

function logReplay(logger: Logger, cache: Cache, seconds: number): void {
  const s = cache.status();
  logger.info('replay', 'log replayed', {
    seconds: Number(seconds.toFixed(3)),
    keys: s.indexKeys,
    dirtyBytes: s.dirtyBytes,
    segmentsUsed: s.segsUsed,
    segments: s.nSegs,
    keyTail: formatPosition(s.keyTail),
    dirtyTail: formatPosition(s.dirtyTail),
    keyHead: formatPosition(s.keyHead),
  });
  if (cache.replayNote) logger.warn('replay', cache.replayNote);
}

function logStart(logger: Logger, cfg: ServeConfig, cache: Cache, backing: BackingDevice, where: { addr: string; uri: string; metrics?: string }): void {
  const s = cache.status();
  logger.info('start', 'serving', {
    cacheDev: cfg.cacheDev,
    cacheSize: cache.medium.size(),
    backingDev: cfg.backingDev,
    backingSize: backing.size(),
    exportSize: cache.size(),
    segments: s.nSegs,
    dataCrc: s.dataCrc,
    cacheMode: s.cacheMode,
    gcPercent: s.gcPercent,
    listen: where.addr,
    uri: where.uri,
    metrics: where.metrics,
    pid: process.pid,
  });
}

/** Client connects at debug; failed requests as rate-limited warnings (a dying disk fails every one). */
function requestLogObserver(logger: Logger): NbdServerObserver {
  return {
    connected: (peer) => logger.debug('connect', 'client connected', { peer }),
    disconnected: (peer) => logger.debug('disconnect', 'client disconnected', { peer }),
    requestDone(op, bytes, _seconds, error) {
      if (error === undefined) return;
      logger.limited('warn', `request-${op}`, 10_000, 'request', `${op} failed; the client got an error`, {
        bytes,
        error: error instanceof Error ? error.message : String(error),
      });
    },
  };
}

function combineObservers(list: NbdServerObserver[]): NbdServerObserver {
  return {
    connected: (peer) => list.forEach((o) => o.connected?.(peer)),
    disconnected: (peer) => list.forEach((o) => o.disconnected?.(peer)),
    requestDone: (op, bytes, seconds, error) => list.forEach((o) => o.requestDone?.(op, bytes, seconds, error)),
  };
}

/** Writes that waited for a free segment, summed over a few seconds into one line. */
function watchSpaceWaits(logger: Logger, cache: Cache): NodeJS.Timeout {
  let seen = cache.status().counters.spaceWaits;
  const timer = setInterval(() => {
    const s = cache.status();
    const waits = s.counters.spaceWaits - seen;
    seen = s.counters.spaceWaits;
    if (waits <= 0) return;
    logger.warn('space-wait', `writes waited for a free cache segment ${waits} time${waits === 1 ? '' : 's'} in ${SPACE_WAIT_LOG_MS / 1000} s`, {
      waits,
      waiting: s.counters.writesWaiting,
      dirtyMiB: Number((s.dirtyBytes / MiB).toFixed(1)),
      segmentsUsed: s.segsUsed,
      segments: s.nSegs,
      writebackError: s.writebackError ?? undefined,
    });
  }, SPACE_WAIT_LOG_MS);
  timer.unref();
  return timer;
}

interface ServeMetrics {
  observer: NbdServerObserver;
  address: string;
  /** The NBD server is created after the metrics (it takes their observer). */
  attach(server: NbdServer): void;
  close(): Promise<void>;
}

/** Metrics load with --metrics only: prom-client stays out of every other start-up. */
async function startServeMetrics(at: { host: string; port: number }, cache: Cache, backing: BackingDevice, logger: Logger): Promise<ServeMetrics> {
  const { createMetrics, startMetricsServer } = await import('./metrics.js');
  let nbd: NbdServer | undefined;
  const m = createMetrics({
    cacheStatus: () => cache.status(),
    nbdStats: () => nbd?.stats() ?? null,
    backing,
  });
  let http: Awaited<ReturnType<typeof startMetricsServer>>;
  try {
    http = await startMetricsServer(m.registry, at.host, at.port, logger);
  } catch (err) {
    m.close();
    throw new CliError(`--metrics ${at.host}:${at.port}: ${err instanceof Error ? err.message : String(err)}`);
  }
  const host = http.host.includes(':') ? `[${http.host}]` : http.host;
  return {
    observer: m.observer,
    address: `${host}:${http.port}`,
    attach: (server) => void (nbd = server),
    close: async () => {
      m.close();
      await http.close();
    },
  };
}
