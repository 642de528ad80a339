import { promises as fsp } from 'node:fs';
import { resolve as resolvePath } from 'node:path';
import type { BackingDevice } from '../backing/backing.js';
import { openBacking } from '../backing/open.js';
import { Cache } from '../cache/cache.js';
import { statusFields } from '../cache/status.js';
import { openFileMedium } from '../media/file.js';
import type { Medium } from '../media/medium.js';
import { createNbdServer, type NbdServer } from '../nbd/server.js';
import { parseArgs, parseSizeOption } from './args.js';
import type { CliIo, Command } from './command.js';
import { startControlServer, type ControlRequest, type ControlResult } from './control.js';
import { CliError, UsageError } from './errors.js';
import { parseMessage, parseTableOptions, type TableOptions } from './table.js';

const GiB = 1024 ** 3;
export const DEFAULT_DIR = 'pcache-data';
export const DEFAULT_CACHE_SIZE = 1 * GiB;
export const DEFAULT_BACKING_SIZE = 4 * GiB;
const DEFAULT_PORT = 10809;

const HELP = `usage: pcache serve [<cache-dev> <backing-dev> [<n> [cache_mode writeback] [data_crc true|false]]]
                    [--listen HOST:PORT | --socket PATH] [--export NAME]

Serve <backing-dev> cached by <cache-dev> over NBD. The options after the devices are
dm-pcache's table options, word for word. With no devices, serve an embedded default:
./${DEFAULT_DIR}/cache.img (1 GiB) in front of ./${DEFAULT_DIR}/backing.img (4 GiB), both
sparse, created when missing. <backing-dev> is a file, a block device or an NBD export
(nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH), reconnected if the connection drops.

  --listen HOST:PORT  TCP address (default 127.0.0.1:${DEFAULT_PORT})
  --socket PATH       listen on a unix socket instead
  --export NAME       export name (default: the empty default export)
  --sequential-cutoff BYTES
                      read streams longer than this (e.g. 4M) are not filled into the
                      cache; 0 turns the cutoff off (default 4M; a pcache extension, also
                      set at run time with: pcache message <cache-dev> sequential_cutoff N)
`;

const SPEC = {
  listen: { type: 'string', value: 'HOST:PORT' },
  socket: { type: 'string', value: 'PATH' },
  export: { type: 'string', value: 'NAME' },
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
  /** Undefined: the engine's default. */
  sequentialCutoff: number | undefined;
}

function parseListen(text: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(text);
  if (!m) throw new UsageError(`--listen takes HOST:PORT, not '${text}'`);
  const port = Number(m[3]);
  if (port > 65535) throw new UsageError(`--listen: port ${port} is out of range`);
  return { host: m[1] ?? (m[2] || '127.0.0.1'), port };
}

/** Everything about the command line is checked here, before any device is touched. */
export function parseServeArgs(argv: readonly string[]): ServeConfig {
  const { options, positionals, help } = parseArgs(argv, SPEC, { min: 0, max: Infinity, names: '<cache-dev> <backing-dev>' });
  if (help) throw new UsageError('--help is handled by the command');
  if (positionals.length === 1) throw new UsageError('missing <backing-dev>');
  const table = parseTableOptions(positionals.slice(2));
  if (options.listen !== undefined && options.socket !== undefined) throw new UsageError('--listen and --socket exclude each other');
  const embedded = positionals.length === 0;
  return {
    cacheDev: embedded ? `${DEFAULT_DIR}/cache.img` : positionals[0]!,
    backingDev: embedded ? `${DEFAULT_DIR}/backing.img` : positionals[1]!,
    table,
    embedded,
    listen: options.socket !== undefined ? null : parseListen(options.listen ?? `127.0.0.1:${DEFAULT_PORT}`),
    socket: options.socket ?? null,
    exportName: options.export ?? '',
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
  if (cfg.embedded) {
    const made = [await ensureSparse(cfg.cacheDev, DEFAULT_CACHE_SIZE), await ensureSparse(cfg.backingDev, DEFAULT_BACKING_SIZE)];
    if (made.some(Boolean)) io.err(`pcache: created ${DEFAULT_DIR}/cache.img (1 GiB) and ${DEFAULT_DIR}/backing.img (4 GiB), sparse\n`);
  }
  let medium: Medium | undefined;
  let backing: BackingDevice | undefined;
  let cache: Cache | undefined;
  let nbd: NbdServer | undefined;
  let control: { close(): Promise<void> } | undefined;
  // The control socket goes last: once it is gone, the device lock is free for the next server.
  const release = async (): Promise<void> => {
    await backing?.close().catch(() => undefined);
    await medium?.close().catch(() => undefined);
    await control?.close().catch(() => undefined);
  };
  try {
    try {
      await fsp.stat(cfg.cacheDev);
    } catch {
      throw new CliError(`cache device ${cfg.cacheDev} does not exist`);
    }
    medium = await openFileMedium(cfg.cacheDev);
    backing = await openBacking(cfg.backingDev, { nbd: { log: (m) => io.err(`pcache: ${m}\n`) } });
    cache = await Cache.open(medium, backing, { dataCrc: cfg.table.dataCrc, cacheMode: cfg.table.cacheMode, sequentialCutoff: cfg.sequentialCutoff });
    nbd = createNbdServer({ device: cache, exportName: cfg.exportName, description: `pcache: ${cfg.backingDev} cached by ${cfg.cacheDev}` });
  } catch (err) {
    await cache?.close().catch(() => undefined);
    await release();
    throw err instanceof CliError ? err : new CliError(err instanceof Error ? err.message : String(err));
  }
  const theCache = cache;
  const theNbd = nbd;
  const theBacking = backing;
  let resolveStopped!: (code: number) => void;
  const stopped = new Promise<number>((r) => (resolveStopped = r));
  let stopping: Promise<void> | null = null;
  const stop = (force: boolean): Promise<void> => {
    if (stopping && !force) return stopping;
    const run = (async () => {
      if (force) {
        // Everything a client saw flushed is durable already; write what is open, briefly.
        await theNbd.close({ force: true }).catch(() => undefined);
        await Promise.race([theCache.close().catch(() => undefined), new Promise((r) => setTimeout(r, 2000))]);
      } else {
        await theNbd.close().catch(() => undefined);
        await theCache.close().catch((e) => io.err(`pcache: closing the cache: ${e instanceof Error ? e.message : e}\n`));
      }
      await release();
      resolveStopped(0);
    })();
    stopping = run;
    return run;
  };

  const handle = async (req: ControlRequest, progress: (d: unknown) => void): Promise<ControlResult> => {
    switch (req.cmd) {
      case 'status':
        return { type: 'result', ok: true, output: statusLine(theCache) };
      case 'table':
        return { type: 'result', ok: true, output: tableLine(cfg, theCache) };
      case 'stats':
        return { type: 'result', ok: true, data: { ...theCache.status(), nbd: theNbd.stats(), ...(theBacking.state ? { backing: theBacking.state() } : {}) } };
      case 'message': {
        const m = parseMessage(req.args);
        if (m === null) return { type: 'result', ok: false, error: 'Invalid argument' };
        if (m.name === 'gc_percent') await theCache.setGcPercent(m.value);
        else theCache.setSequentialCutoff(m.value);
        return { type: 'result', ok: true, output: '' };
      }
      case 'flush':
        await theCache.drain({ onProgress: (s) => progress({ dirtyBytes: s.dirtyBytes, dirtyTail: s.dirtyTail, keyHead: s.keyHead, writtenBack: s.counters.writtenBackBytes }) });
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
    control = await startControlServer(cfg.cacheDev, handle);
    if (cfg.socket) {
      await theNbd.listenUnix(cfg.socket);
      addr = cfg.socket;
      uri = `nbd+unix:///${cfg.exportName}?socket=${resolvePath(cfg.socket)}`;
    } else {
      const a = await theNbd.listenTcp(cfg.listen!.host, cfg.listen!.port);
      addr = `${a.host}:${a.port}`;
      const host = a.host.includes(':') ? `[${a.host}]` : a.host;
      uri = `nbd://${host}:${a.port}/${cfg.exportName}`;
    }
  } catch (err) {
    await theNbd.close({ force: true }).catch(() => undefined);
    await theCache.close().catch(() => undefined);
    await release();
    throw new CliError(err instanceof Error ? err.message : String(err));
  }
  if (theCache.replayNote) io.err(`pcache: ${theCache.replayNote}\n`);
  io.err(connectHelp(cfg, addr, uri));
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
