/**
 * Progress of long work (flush, writeback, check) on stderr: a redrawn bar with bytes and rate on
 * a terminal, a plain line every few seconds otherwise (logs, pipes, CI). One module, so the three
 * commands look and behave alike.
 */
import type { CliIo } from './command.js';
import { processIo } from './command.js';

const MiB = 2 ** 20;
const BAR_WIDTH = 30;
const TTY_REDRAW_MS = 100;
const LINE_EVERY_MS = 2_000;

export function mib(bytes: number): string {
  return `${(bytes / MiB).toFixed(1)} MiB`;
}

export interface ProgressOptions {
  /** What is being done, e.g. 'writeback' (starts each plain line). */
  label: string;
  /** Bytes the work will cover; null when unknown (then no bar and no percentage). */
  total: number | null;
  /** Redraw a bar in place; default: when `io` is the process's and stderr is a terminal. */
  tty?: boolean;
  quiet?: boolean;
  /** Plain lines at most this often (default 2 s). */
  lineEveryMs?: number;
  /** Show nothing until the work has taken this long: quick work stays quiet (default 0). */
  quietForMs?: number;
  now?: () => number;
}

export class Progress {
  private readonly tty: boolean;
  private readonly started: number;
  private lastDraw = -Infinity;
  private drawn = false;
  /** Something was written: a forced final update then closes what was begun. */
  private shown = false;
  private readonly now: () => number;
  private readonly lineEveryMs: number;
  private total: number | null;

  constructor(
    private readonly io: CliIo,
    private readonly opts: ProgressOptions,
  ) {
    this.tty = opts.tty ?? (io === processIo && process.stderr.isTTY === true);
    this.now = opts.now ?? Date.now;
    this.started = this.now();
    this.total = opts.total;
    this.lineEveryMs = opts.lineEveryMs ?? LINE_EVERY_MS;
  }

  /** The work turned out bigger (new dirty data during a flush): grow the total. */
  setTotal(total: number): void {
    this.total = total;
  }

  /**
   * `done` bytes of the total so far; `rateBytes` the bytes the rate is computed from (default
   * `done`); `note` is appended (e.g. the last error). Throttled unless `force`.
   */
  update(done: number, extra: { rateBytes?: number; note?: string | null; detail?: string; force?: boolean } = {}): void {
    if (this.opts.quiet) return;
    const now = this.now();
    if (now - this.started < (this.opts.quietForMs ?? 0) && !(extra.force && this.shown)) return;
    if (!extra.force && now - this.lastDraw < (this.tty ? TTY_REDRAW_MS : this.lineEveryMs)) return;
    this.lastDraw = now;
    this.shown = true;
    const secs = Math.max(0.001, (now - this.started) / 1000);
    const rate = (extra.rateBytes ?? done) / MiB / secs;
    const total = this.total;
    const frac = total === null ? null : total > 0 ? Math.min(1, Math.max(0, done / total)) : 1;
    let text = frac === null ? `${mib(done)}` : `${Math.floor(frac * 100).toString().padStart(3)}%  ${mib(done)} of ${mib(total!)}`;
    text += `${extra.detail ? `, ${extra.detail}` : ''}, ${rate.toFixed(1)} MiB/s, ${Math.floor(secs)} s`;
    if (extra.note) text += `  (${extra.note})`;
    if (this.tty) {
      const bar = frac === null ? '' : `[${'#'.repeat(Math.round(frac * BAR_WIDTH))}${'.'.repeat(BAR_WIDTH - Math.round(frac * BAR_WIDTH))}] `;
      this.io.err(`\r\x1b[K${bar}${text}`);
      this.drawn = true;
    } else {
      this.io.err(`pcache: ${this.opts.label}: ${text}\n`);
    }
  }

  /** Ends the bar's line, so what follows starts on a fresh one. */
  end(): void {
    if (this.drawn) this.io.err('\n');
    this.drawn = false;
  }
}
