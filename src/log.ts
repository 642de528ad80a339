/**
 * One line per event on stderr: an ISO time, a level, an event name, a message and key=value
 * fields; or one JSON object per line for log collectors. A leaf module: every layer may log
 * through the Logger it was given, none reaches for process.stderr itself.
 */

export const LOG_LEVELS = ['debug', 'info', 'warn', 'error'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];
export type LogFormat = 'text' | 'json';
export type LogFields = Record<string, string | number | boolean | null | undefined>;

export interface Logger {
  debug(event: string, msg: string, fields?: LogFields): void;
  info(event: string, msg: string, fields?: LogFields): void;
  warn(event: string, msg: string, fields?: LogFields): void;
  error(event: string, msg: string, fields?: LogFields): void;
  /** Whether a line at this level would be written (to skip building costly fields). */
  enabled(level: LogLevel): boolean;
  /**
   * Logs at most one line per `key` every `intervalMs`; the next line that goes out says how
   * many were suppressed meanwhile. For errors that repeat on every retry.
   */
  limited(level: LogLevel, key: string, intervalMs: number, event: string, msg: string, fields?: LogFields): void;
}

export interface LoggerOptions {
  level?: LogLevel;
  format?: LogFormat;
  write?: (line: string) => void;
  now?: () => Date;
}

const RANK: Record<LogLevel, number> = { debug: 0, info: 1, warn: 2, error: 3 };

export function parseLogLevel(text: string): LogLevel | null {
  return (LOG_LEVELS as readonly string[]).includes(text) ? (text as LogLevel) : null;
}

function textValue(v: string | number | boolean | null): string {
  const s = String(v);
  return /^[^\s"=]*$/.test(s) && s !== '' ? s : JSON.stringify(s);
}

export function createLogger(options: LoggerOptions = {}): Logger {
  const min = RANK[options.level ?? 'info'];
  const format = options.format ?? 'text';
  const write = options.write ?? ((line: string) => void process.stderr.write(line));
  const now = options.now ?? (() => new Date());
  const lastAt = new Map<string, number>();
  const suppressed = new Map<string, number>();

  function emit(level: LogLevel, event: string, msg: string, fields?: LogFields): void {
    if (RANK[level] < min) return;
    const time = now().toISOString();
    if (format === 'json') {
      const record: Record<string, unknown> = { time, level, event, msg };
      for (const [k, v] of Object.entries(fields ?? {})) if (v !== undefined) record[k] = v;
      write(`${JSON.stringify(record)}\n`);
      return;
    }
    let line = `${time} ${level.toUpperCase().padEnd(5)} ${event}: ${msg}`;
    for (const [k, v] of Object.entries(fields ?? {})) if (v !== undefined) line += ` ${k}=${textValue(v)}`;
    write(`${line}\n`);
  }

  return {
    debug: (e, m, f) => emit('debug', e, m, f),
    info: (e, m, f) => emit('info', e, m, f),
    warn: (e, m, f) => emit('warn', e, m, f),
    error: (e, m, f) => emit('error', e, m, f),
    enabled: (level) => RANK[level] >= min,
    limited(level, key, intervalMs, event, msg, fields) {
      if (RANK[level] < min) return;
      const t = now().getTime();
      const last = lastAt.get(key);
      if (last !== undefined && t - last < intervalMs) {
        suppressed.set(key, (suppressed.get(key) ?? 0) + 1);
        return;
      }
      lastAt.set(key, t);
      const dropped = suppressed.get(key) ?? 0;
      suppressed.delete(key);
      emit(level, event, msg, dropped > 0 ? { ...fields, suppressed: dropped } : fields);
    },
  };
}

/** For library use and tests that do not care: logs nothing. */
export const silentLogger: Logger = createLogger({ level: 'error', write: () => {} });
