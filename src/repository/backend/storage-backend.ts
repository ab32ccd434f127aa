/** Where a repository's files live. Small on purpose (restic's backend interface): S3 must fit it later. */
export interface StorageBackend {
  /** Human-readable location, for messages. */
  readonly location: string;
  /** Writes a whole file atomically: afterwards the name holds all of `data` or nothing. */
  put(name: string, data: Buffer | readonly Buffer[]): Promise<void>;
  /** Starts an incremental upload of a large file (a pack); nothing is visible until `commit`. */
  openUpload(name: string): Promise<BackendUpload>;
  get(name: string): Promise<Buffer>;
  getRange(name: string, offsetBytes: number, lengthBytes: number): Promise<Buffer>;
  /** Files directly under `folder` (recursive for `data`), names relative to the repository root. */
  list(folder: string): Promise<BackendEntry[]>;
  delete(name: string): Promise<void>;
  exists(name: string): Promise<boolean>;
  close(): Promise<void>;
}

export interface BackendEntry {
  name: string;
  sizeBytes: number;
  modifiedMs: number;
}

export interface BackendUpload {
  write(pieces: readonly Buffer[]): Promise<void>;
  readonly writtenBytes: number;
  /** Makes the bytes written so far durable, still invisible under the final name (optional before commit). */
  sync(): Promise<void>;
  /** Makes the file visible under its final name, complete (syncs first if `sync` was not called). */
  commit(): Promise<void>;
  abort(): Promise<void>;
}
