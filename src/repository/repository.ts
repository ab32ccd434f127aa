import { randomBytes } from 'node:crypto';
import { mkdir, readdir, stat, writeFile, rename, open } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { SnapshiftError } from '../core/errors.ts';
import { faultPoint } from '../core/fault-points.ts';
import { LocalBackend } from './backend/local-backend.ts';
import { RateLimitedBackend } from './backend/rate-limited-backend.ts';
import type { StorageBackend } from './backend/storage-backend.ts';
import { BlobWorkerPool } from './blob-worker-pool.ts';
import { ChunkIndex } from './chunk-index.ts';
import { decodeIndexFile, encodeIndexFile, packPath, readPackTrailer, type BlobEntry, type IndexFileContent } from './pack-format.ts';
import { keysFromMaster, makeKeySlot, newMasterKey, openKeySlot, parseKeySlot, type RepositoryKeys } from './repository-keys.ts';
import { checkChunkSize, defaultChunkSizeBytes, defaultPackTargetBytes, formatCompression, formatVersion, maxPackTargetBytes, packTargetIsValid, parseCompression, parseConfig, type RepositoryConfig } from './repository-config.ts';
import { manifestPath, readManifestHeader, summaryOf, type RestorePointSummary } from './manifest.ts';
import { RepositoryLock, assertNotLocked, type LockKind } from './repository-lock.ts';
import { BackupWriter } from './backup-writer.ts';
import { removeDeadTempFiles } from './temp-files.ts';
import { RestorePointReader } from './restore-point-reader.ts';

export interface RepositoryOptions {
  /** undefined = the repository must be unencrypted. */
  password?: string;
  /** Blob workers for hashing, compression and encryption (default 2). */
  workers?: number;
  /** Caps writes to the backend (bytes/s): a slow target, or sparing a shared one. */
  maxWriteBytesPerSecond?: number;
}

export interface InitOptions {
  password?: string;
  encryption: boolean;
  chunkSizeBytes?: number;
  compression?: string;
  packTargetBytes?: number;
}

/** Creates a repository at `path` (an empty or missing folder). The config is written last: it marks a finished init. */
export async function initRepository(path: string, opts: InitOptions): Promise<void> {
  const location = resolve(path);
  const chunkSizeBytes = opts.chunkSizeBytes ?? defaultChunkSizeBytes;
  checkChunkSize(chunkSizeBytes);
  // Written as `zstd:N` whatever the spelling asked for (`zstd` is level 1): the config has one form.
  const compression = formatCompression(parseCompression(opts.compression ?? 'zstd:1'));
  const packTargetBytes = opts.packTargetBytes ?? defaultPackTargetBytes;
  if (!packTargetIsValid(packTargetBytes)) throw new SnapshiftError('BAD_ARGUMENT', `pack target ${packTargetBytes} is not a whole number of bytes from 1 to ${maxPackTargetBytes}`);
  if (opts.encryption && !opts.password) throw new SnapshiftError('REPO_PASSWORD_REQUIRED', 'an encrypted repository needs a password (or ask for --no-encryption explicitly)');
  const existing: string[] = await readdir(location).catch((error: NodeJS.ErrnoException) => {
    if (error.code === 'ENOENT') return [];
    throw error;
  });
  if (existing.includes('config')) throw new SnapshiftError('REPO_EXISTS', `a repository already exists at ${location}`);
  if (existing.length > 0) throw new SnapshiftError('REPO_EXISTS', `${location} is not empty; a repository needs an empty or new folder`);
  // 0700 folders, 0600 files (the backend's too): key slots and config are readable by the owner only.
  for (const folder of ['keys', 'data', 'index', 'manifests', 'locks', 'tmp']) await mkdir(join(location, folder), { recursive: true, mode: 0o700 });
  const master = newMasterKey();
  const config: RepositoryConfig = {
    format: 'snapshift-repository',
    version: formatVersion,
    id: randomBytes(16).toString('hex'),
    createdAt: new Date().toISOString(),
    chunkSizeBytes,
    compression,
    encryption: opts.encryption ? 'aes-256-gcm' : 'none',
    packTargetBytes,
  };
  const backend = new LocalBackend(location);
  if (opts.encryption) {
    const slot = await makeKeySlot(master, opts.password!);
    await backend.put(`keys/${randomBytes(8).toString('hex')}.json`, Buffer.from(JSON.stringify(slot, null, 2)));
  } else {
    config.idKey = master.subarray(32).toString('hex');
  }
  const temp = join(location, 'tmp', 'config.tmp');
  await writeFile(temp, JSON.stringify(config, null, 2) + '\n', { mode: 0o600 });
  const handle = await open(temp, 'r+');
  await handle.sync();
  await handle.close();
  await rename(temp, join(location, 'config'));
}

/** Opens a repository: reads its config, opens a key slot, loads the index. */
export async function openRepository(path: string, opts: RepositoryOptions): Promise<Repository> {
  const location = resolve(path);
  const info = await stat(location).catch(() => undefined);
  if (!info?.isDirectory()) throw new SnapshiftError('REPO_NOT_FOUND', `no repository at ${location} (create one with "snapshift repo init ${location}")`);
  const backend = new LocalBackend(location);
  const configText = await backend.get('config').catch((error: NodeJS.ErrnoException) => {
    if (error.code === 'ENOENT') throw new SnapshiftError('REPO_NOT_FOUND', `no repository at ${location}: it has no config file (create one with "snapshift repo init ${location}")`);
    throw error;
  });
  const config = parseConfig(configText.toString('utf8'), location);
  let keys: RepositoryKeys;
  if (config.encryption === 'none') {
    keys = keysFromMaster(Buffer.concat([Buffer.alloc(32), Buffer.from(config.idKey!, 'hex')]), false);
  } else {
    if (opts.password === undefined) throw new SnapshiftError('REPO_PASSWORD_REQUIRED', `repository ${location} is encrypted: give its password (--password-file, SNAPSHIFT_PASSWORD or the prompt)`);
    keys = await unlock(backend, opts.password);
  }
  const target = opts.maxWriteBytesPerSecond ? new RateLimitedBackend(backend, opts.maxWriteBytesPerSecond) : backend;
  const repository = new Repository(location, target, config, keys, opts.workers ?? 2);
  await repository.loadIndex();
  return repository;
}

async function unlock(backend: StorageBackend, password: string): Promise<RepositoryKeys> {
  const slots = await backend.list('keys');
  if (slots.length === 0) throw new SnapshiftError('REPO_KEY_DAMAGED', `repository ${backend.location} has no key slots left (keys/ is empty)`);
  for (const entry of slots) {
    const slot = parseKeySlot((await backend.get(entry.name)).toString('utf8'), entry.name);
    const master = await openKeySlot(slot, password);
    if (master) return keysFromMaster(master, true);
  }
  throw new SnapshiftError('REPO_BAD_PASSWORD', `wrong password for repository ${backend.location} (no key slot opened)`);
}

/** A sealed pack and its blobs, as an index file lists them. */
export interface SealedPack {
  packId: string;
  blobs: BlobEntry[];
}

/** Packs per index file a writer writes (docs/FORMAT.md § Index files). */
const packsPerIndexFile = 16;

/** One open repository. Methods marked "internal" serve check, forget and gc. */
export class Repository implements AsyncDisposable {
  /** internal: the in-memory index and the packs its packNo values name. */
  index = new ChunkIndex();
  packIds: string[] = [];
  readonly packNoOf = new Map<string, number>();
  /** internal: index files loaded, and those that failed to open (their packs were read from trailers). */
  indexFiles: string[] = [];
  damagedIndexFiles: Array<{ name: string; reason: string }> = [];
  #indexStale = false;
  #pool: BlobWorkerPool | undefined;
  /**
   * Packs sealed by any writer of this process that no finished index file lists yet. They are in the
   * in-memory index at once, so another writer may dedup against them: its manifest must then wait until
   * they are in an index file (`flushIndex`), whoever sealed them.
   */
  readonly #unindexedPacks: SealedPack[] = [];
  /** Packs of the index write in flight. */
  readonly #indexingPacks = new Set<SealedPack>();
  /** Index writes of writers run one at a time, in order: awaiting the last one awaits them all. */
  #indexWrites: Promise<void> = Promise.resolve();
  /** The shared lock readers of this Repository hold together (`lockForReading`). */
  #readLock: { holders: number; acquired: Promise<RepositoryLock | undefined> } | undefined;

  constructor(
    readonly path: string,
    readonly backend: StorageBackend,
    readonly config: RepositoryConfig,
    readonly keys: RepositoryKeys,
    readonly workerCount: number,
  ) {}

  get chunkSizeBytes(): number {
    return this.config.chunkSizeBytes;
  }

  /** internal: the blob workers, started on first use. */
  pool(): BlobWorkerPool {
    const compression = parseCompression(this.config.compression);
    this.#pool ??= new BlobWorkerPool(this.keys, compression.kind === 'zstd' ? compression.level : 0, this.config.chunkSizeBytes, this.workerCount);
    return this.#pool;
  }

  /** internal: registers a pack and returns its number in the in-memory index. */
  packNo(packId: string): number {
    let packNo = this.packNoOf.get(packId);
    if (packNo === undefined) {
      packNo = this.packIds.length;
      this.packIds.push(packId);
      this.packNoOf.set(packId, packNo);
    }
    return packNo;
  }

  /** internal: adds a sealed pack's blobs to the in-memory index. */
  addPack(packId: string, blobs: readonly BlobEntry[]): void {
    const packNo = this.packNo(packId);
    for (const blob of blobs) this.index.add(blob.id, { packNo, offsetBytes: blob.offsetBytes, storedLength: blob.storedLength, compressed: blob.compressed });
  }

  /** internal: (re)loads the index from index files; packs of damaged index files are read from their trailers. */
  async loadIndex(): Promise<void> {
    const files = (await this.backend.list('index')).map((e) => e.name).sort();
    const contents: IndexFileContent[] = [];
    const damaged: Array<{ name: string; reason: string }> = [];
    let entries = 0;
    for (const name of files) {
      try {
        const content = decodeIndexFile(this.keys, await this.backend.get(name), name);
        contents.push(content);
        for (const pack of content.packs) entries += pack.blobs.length;
      } catch (error) {
        if (!(error instanceof SnapshiftError)) throw error;
        damaged.push({ name, reason: error.message });
      }
    }
    this.index = new ChunkIndex(entries);
    this.packIds = [];
    this.packNoOf.clear();
    for (const content of contents) for (const pack of content.packs) this.addPack(pack.packId, pack.blobs);
    // Packs writers of this process sealed but no index file lists yet stay known (a writer may dedup against them).
    for (const pack of [...this.#indexingPacks, ...this.#unindexedPacks]) this.addPack(pack.packId, pack.blobs);
    if (damaged.length > 0) {
      for (const entry of await this.backend.list('data')) {
        const packId = entry.name.split('/').at(-1)!;
        if (this.packNoOf.has(packId)) continue;
        try {
          this.addPack(packId, await readPackTrailer(this.keys, packId, entry.sizeBytes, (o, l) => this.backend.getRange(entry.name, o, l)));
        } catch (error) {
          if (!(error instanceof SnapshiftError)) throw error;
        }
      }
    }
    this.indexFiles = files;
    this.damagedIndexFiles = damaged;
    this.#indexStale = false;
  }

  /** internal: the next backup must reload the index (after gc, or an abort whose index write failed). */
  markIndexStale(): void {
    this.#indexStale = true;
  }

  /**
   * internal: a writer sealed a pack: it goes into the in-memory index at once (dedup) and joins the packs
   * waiting for an index file. True when enough wait for an index file to be written now.
   */
  packSealed(packId: string, blobs: BlobEntry[]): boolean {
    this.addPack(packId, blobs);
    this.#unindexedPacks.push({ packId, blobs });
    return this.#unindexedPacks.length >= packsPerIndexFile;
  }

  /**
   * internal: writes index files for every pack sealed so far by any writer of this process, after any index
   * write in flight. When it resolves, every pack the in-memory index got from a writer before the call is in
   * an index file on disk: a manifest written after it names only indexed chunks.
   */
  flushIndex(): Promise<void> {
    const step = this.#indexWrites.then(async () => {
      while (this.#unindexedPacks.length > 0) {
        const packs = this.#unindexedPacks.splice(0, packsPerIndexFile);
        for (const pack of packs) this.#indexingPacks.add(pack);
        try {
          await this.writeIndexFile(packs);
        } catch (error) {
          this.#unindexedPacks.unshift(...packs); // the next flush tries again
          throw error;
        } finally {
          for (const pack of packs) this.#indexingPacks.delete(pack);
        }
        faultPoint('repo.after-index-write');
      }
    });
    this.#indexWrites = step.catch(() => undefined);
    return step;
  }

  /** internal: writes one index file for `packs`. */
  async writeIndexFile(packs: SealedPack[]): Promise<string> {
    const name = `index/${randomBytes(32).toString('hex')}`;
    await this.backend.put(name, encodeIndexFile(this.keys, { packs }));
    this.indexFiles.push(name);
    return name;
  }

  /** internal: takes a repository lock. */
  async lock(kind: LockKind, purpose: string): Promise<RepositoryLock> {
    const lock = await RepositoryLock.acquire(this.backend, kind, purpose);
    if (kind === 'exclusive') {
      // No writer of ours is active (each holds a shared lock): packs still waiting for an index file are
      // those of writers that ended without writing it. They are garbage on disk like a crashed writer's,
      // and must not be indexed later (gc may delete them now).
      this.#unindexedPacks.length = 0;
      this.#indexStale = true;
    }
    return lock;
  }

  /**
   * A shared lock for reading restore points (restore, check), so gc cannot delete packs under the reader.
   * Reentrant: readers of this Repository share one lock file, released when the last of them is. Where no
   * lock can be written (a read-only repository), reading goes on without one: `onWarning` hears it once,
   * and a live exclusive lock still refuses. The index is reloaded if gc ran since it was loaded.
   */
  async lockForReading(purpose: string, onWarning?: (message: string) => void): Promise<AsyncDisposable & { release(): Promise<void> }> {
    if (!this.#readLock) {
      const shared = { holders: 0, acquired: this.#acquireReadLock(purpose, onWarning) };
      this.#readLock = shared;
      shared.acquired.catch(() => {
        if (this.#readLock === shared) this.#readLock = undefined;
      });
    }
    const shared = this.#readLock;
    shared.holders++;
    try {
      await shared.acquired;
    } catch (error) {
      shared.holders--;
      throw error;
    }
    let released = false;
    const release = async (): Promise<void> => {
      if (released) return;
      released = true;
      if (--shared.holders > 0) return;
      if (this.#readLock === shared) this.#readLock = undefined;
      await (await shared.acquired)?.release();
    };
    return { release, [Symbol.asyncDispose]: release };
  }

  async #acquireReadLock(purpose: string, onWarning: ((message: string) => void) | undefined): Promise<RepositoryLock | undefined> {
    let lock: RepositoryLock | undefined;
    try {
      lock = await this.lock('shared', purpose);
    } catch (error) {
      const why = readOnlyReason(error);
      if (why === undefined) throw error;
      await assertNotLocked(this.backend, 'shared');
      onWarning?.(`repository ${this.path} cannot be locked (${why}): reading it without a lock`);
    }
    try {
      await this.#reloadIndexIfChanged();
    } catch (error) {
      await lock?.release();
      throw error;
    }
    return lock;
  }

  /** Another process may have run gc or repair-index since we loaded: reload when the set of index files changed. */
  async #reloadIndexIfChanged(): Promise<void> {
    const current = (await this.backend.list('index')).map((e) => e.name).sort();
    const known = new Set(this.indexFiles);
    if (this.#indexStale || current.some((n) => !known.has(n)) || this.indexFiles.some((n) => !current.includes(n))) await this.loadIndex();
  }

  /** Takes a shared lock until the writer commits or aborts. */
  async startBackup(opts: { vmName: string; baseRestorePointId?: string }): Promise<BackupWriter> {
    const lock = await this.lock('shared', `backup of ${opts.vmName}`);
    try {
      // What a killed writer on this host left in tmp/ goes now, not after gc's safety window.
      await removeDeadTempFiles(this.backend);
      await this.#reloadIndexIfChanged();
      const base = opts.baseRestorePointId === undefined ? undefined : await this.openRestorePoint(opts.baseRestorePointId);
      return new BackupWriter(this, lock, opts.vmName, base);
    } catch (error) {
      await lock.release();
      throw error;
    }
  }

  /** Restore points, oldest first; damaged manifests are left out (check reports them). */
  async listRestorePoints(vmName?: string): Promise<RestorePointSummary[]> {
    const result: RestorePointSummary[] = [];
    for (const id of await this.restorePointIds()) {
      try {
        const header = await readManifestHeader(this.backend, this.keys, id);
        if (vmName === undefined || header.vmName === vmName) result.push(summaryOf(header));
      } catch (error) {
        if (!(error instanceof SnapshiftError)) throw error;
      }
    }
    return result.sort((a, b) => a.createdAt.localeCompare(b.createdAt) || a.id.localeCompare(b.id));
  }

  /** internal: ids of every manifest file. */
  async restorePointIds(): Promise<string[]> {
    return (await this.backend.list('manifests')).map((e) => e.name.split('/').at(-1)!).filter((n) => /^[0-9a-f]{32}$/.test(n));
  }

  /** True while the manifest of restore point `id` (a full id) exists. */
  hasRestorePoint(id: string): Promise<boolean> {
    return this.backend.exists(manifestPath(id));
  }

  /** Opens a restore point by id or unique id prefix. */
  async openRestorePoint(id: string): Promise<RestorePointReader> {
    return RestorePointReader.open(this, await this.resolveRestorePointId(id));
  }

  async resolveRestorePointId(prefix: string): Promise<string> {
    const matches = (await this.restorePointIds()).filter((id) => id.startsWith(prefix.toLowerCase()));
    if (matches.length === 0 || prefix === '') throw new SnapshiftError('REPO_RESTORE_POINT_NOT_FOUND', `no restore point ${prefix} in repository ${this.path}`);
    if (matches.length > 1) throw new SnapshiftError('REPO_RESTORE_POINT_AMBIGUOUS', `restore point prefix ${prefix} matches ${matches.length} restore points; give more characters`);
    return matches[0]!;
  }

  /** internal: path of a pack by number. */
  packPathOf(packNo: number): string {
    return packPath(this.packIds[packNo]!);
  }

  async close(): Promise<void> {
    await this.#pool?.close();
    this.#pool = undefined;
    await this.backend.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/** Why a lock file could not be written if the repository is read-only (to us), else undefined. */
function readOnlyReason(error: unknown): string | undefined {
  const errno = (error instanceof SnapshiftError ? error.cause : error) as NodeJS.ErrnoException | undefined;
  if (error instanceof SnapshiftError && error.code === 'REPO_READ_ONLY') return 'read-only file system';
  if (errno?.code === 'EROFS') return 'read-only file system';
  if (errno?.code === 'EACCES' || errno?.code === 'EPERM') return 'no write permission';
  return undefined;
}

export { manifestPath };
