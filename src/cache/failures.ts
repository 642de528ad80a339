/**
 * Background failures made visible: write-back and GC errors retry on their own, so nobody would
 * see them otherwise. Each is logged (rate-limited, with the log position and errno, as dm-pcache's
 * "writeback error: %d" is) and the last one kept, with its time, for `pcache stats`.
 */
import { constants } from 'node:os';
import { formatPosition, type Position } from '../format/index.js';
import type { Logger } from '../log.js';

/** The last failure of one background engine. */
export interface FailureNote {
  message: string;
  /** The errno name (EIO, ENOSPC, ...) when the error carried one. */
  errno: string | null;
  /** ISO time of the failure. */
  at: string;
  /** Where the engine stood: dirty_tail for write-back, key_tail for GC. */
  position: string;
  /** Failures of this engine since the cache was opened. */
  count: number;
}

/** One line for `pcache stats`. */
export function describeFailure(n: FailureNote): string {
  return `${n.at} ${n.errno ?? 'error'} at ${n.position}: ${n.message} (${n.count} so far)`;
}

/** How often one engine's failures reach the log: the first at once, then one line per interval. */
const LOG_INTERVAL_MS = 10_000;

export class FailureLog {
  private readonly notes = new Map<string, FailureNote>();

  constructor(
    private readonly logger: Logger,
    private readonly now: () => Date = () => new Date(),
  ) {}

  /** `engine` is 'writeback' or 'gc'; `tail` names the position ('dirty_tail', 'key_tail'). */
  record(engine: string, tail: string, err: unknown, pos: Position): void {
    const code = (err as { code?: unknown } | null)?.code;
    const errno = typeof code === 'string' && code.startsWith('E') ? code : null;
    const message = err instanceof Error ? err.message : String(err);
    const position = `${tail} ${formatPosition(pos)}`;
    const count = (this.notes.get(engine)?.count ?? 0) + 1;
    this.notes.set(engine, { message, errno, at: this.now().toISOString(), position, count });
    const num = errno ? (constants.errno as Record<string, number>)[errno] : undefined;
    const head = errno && num !== undefined ? `${engine} error: ${-num} (${errno})` : `${engine} error`;
    this.logger.limited('error', engine, LOG_INTERVAL_MS, `${engine}_error`, `${head}: ${message}`, {
      [tail]: formatPosition(pos),
      errno: errno ?? undefined,
      failures: count,
    });
  }

  last(engine: string): FailureNote | null {
    const n = this.notes.get(engine);
    return n ? { ...n } : null;
  }
}
