/**
 * The backing device: the slow storage that pcache fronts. A file, a block device, memory in
 * tests, or an NBD export (nbd.ts). Every call either completes whole or rejects; a failing
 * backing device rejects, it never returns zeros.
 */
export interface BackingDevice {
  /** A label for messages and the table line (a path or a URI). */
  readonly name: string;
  /** Size in bytes. */
  size(): number;
  /** Fill `buf` from `offset`. */
  read(buf: Buffer, offset: number): Promise<void>;
  /** Write `data` at `offset`. */
  write(data: Buffer, offset: number): Promise<void>;
  /** Make every completed write durable. */
  flush(): Promise<void>;
  close(): Promise<void>;
  /** Connection state, for backing devices that have one (NBD); shown by status and stats. */
  state?(): BackingState;
}

/** What every backing state has; kinds add their own fields (NbdBackingState). */
export interface BackingState {
  kind: string;
  name: string;
  /** 'connected', 'degraded', 'disconnected', 'closed'. */
  state: string;
  connected: boolean;
  lastError: string | null;
}
