/** Messages between the main thread and blob workers (hash, compress, encrypt, and the reverse). */
export type BlobRequest =
  | { op: 'hash'; task: number; data: Uint8Array }
  | { op: 'seal'; task: number }
  | { op: 'drop'; task: number }
  | { op: 'open'; task: number; id: Uint8Array; blob: Uint8Array; compressed: boolean; verify: boolean };

export type BlobReply =
  | { task: number; kind: 'zero'; busyMs: number }
  | { task: number; kind: 'hashed'; id: Uint8Array; busyMs: number }
  | { task: number; kind: 'sealed'; pieces: Uint8Array[]; storedLength: number; rawLength: number; compressed: boolean; busyMs: number }
  | { task: number; kind: 'opened'; data: Uint8Array; busyMs: number }
  | { task: number; kind: 'failed'; reason: string; busyMs: number };

export interface BlobWorkerData {
  __entry: string;
  dataKey: Uint8Array | undefined;
  idKey: Uint8Array;
  compressionLevel: number; // 0 = none
  maxChunkBytes: number;
}
