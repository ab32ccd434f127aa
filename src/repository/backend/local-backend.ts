import { open, readFile, readdir, rename, rm, stat, mkdir, type FileHandle } from 'node:fs/promises';
import { join, dirname } from 'node:path';
import { SnapshiftError } from '../../core/errors.ts';
import type { BackendEntry, BackendUpload, StorageBackend } from './storage-backend.ts';
import { ownTempFileName } from '../temp-files.ts';

/**
 * A repository in a local directory. Every put is temp file + fsync + rename + fsync of the folder. Files
 * are created 0600 and folders 0700: key slots, config and data are the owner's alone.
 */
export class LocalBackend implements StorageBackend {
  readonly #handles = new Map<string, Promise<FileHandle>>();
  constructor(readonly location: string) {}

  async put(name: string, data: Buffer | readonly Buffer[]): Promise<void> {
    const upload = await this.openUpload(name);
    try {
      await upload.write(Buffer.isBuffer(data) ? [data] : data);
      await upload.commit();
    } catch (error) {
      await upload.abort();
      throw error;
    }
  }

  async openUpload(name: string): Promise<BackendUpload> {
    const tempPath = join(this.location, 'tmp', ownTempFileName());
    const finalPath = join(this.location, name);
    const handle = await fsCall(this.location, () => open(tempPath, 'wx', 0o600));
    let writtenBytes = 0;
    let done = false;
    let synced = false;
    const sync = async (): Promise<void> => {
      if (synced) return;
      await fsCall(this.location, () => handle.sync());
      synced = true;
    };
    return {
      get writtenBytes() {
        return writtenBytes;
      },
      write: async (pieces) => {
        let total = 0;
        for (const piece of pieces) total += piece.length;
        await fsCall(this.location, async () => {
          let { bytesWritten } = await handle.writev(pieces as Buffer[]);
          // writev may write less than asked on some file systems: finish the rest.
          while (bytesWritten < total) {
            const rest = Buffer.concat(pieces as Buffer[]).subarray(bytesWritten);
            bytesWritten += (await handle.write(rest)).bytesWritten;
          }
        });
        writtenBytes += total;
        synced = false;
      },
      sync,
      commit: async () => {
        await sync();
        await fsCall(this.location, async () => {
          await handle.close();
          done = true;
          await mkdir(dirname(finalPath), { recursive: true, mode: 0o700 });
          await rename(tempPath, finalPath);
          await syncFolder(dirname(finalPath));
        });
      },
      abort: async () => {
        if (!done) await handle.close().catch(() => undefined);
        done = true;
        await rm(tempPath, { force: true });
      },
    };
  }

  async get(name: string): Promise<Buffer> {
    return fsCall(this.location, () => readFile(join(this.location, name)));
  }

  async getRange(name: string, offsetBytes: number, lengthBytes: number): Promise<Buffer> {
    const handle = await this.#handle(name);
    const buffer = Buffer.allocUnsafe(lengthBytes);
    let done = 0;
    while (done < lengthBytes) {
      const { bytesRead } = await handle.read(buffer, done, lengthBytes - done, offsetBytes + done);
      if (bytesRead === 0) throw new SnapshiftError('REPO_SHORT_READ', `${join(this.location, name)} ends before byte ${offsetBytes + lengthBytes} (file truncated?)`);
      done += bytesRead;
    }
    return buffer;
  }

  async list(folder: string): Promise<BackendEntry[]> {
    const entries: BackendEntry[] = [];
    const walk = async (relative: string): Promise<void> => {
      let names;
      try {
        names = await readdir(join(this.location, relative), { withFileTypes: true });
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
        throw error;
      }
      for (const entry of names) {
        const child = `${relative}/${entry.name}`;
        if (entry.isDirectory()) await walk(child);
        else if (entry.isFile()) {
          const info = await stat(join(this.location, child)).catch(() => undefined);
          if (info) entries.push({ name: child, sizeBytes: info.size, modifiedMs: info.mtimeMs });
        }
      }
    };
    await walk(folder);
    return entries;
  }

  async delete(name: string): Promise<void> {
    const cached = this.#handles.get(name);
    if (cached) {
      this.#handles.delete(name);
      await (await cached.catch(() => undefined))?.close().catch(() => undefined);
    }
    await rm(join(this.location, name), { force: true });
  }

  async exists(name: string): Promise<boolean> {
    return stat(join(this.location, name)).then(() => true, () => false);
  }

  async close(): Promise<void> {
    const handles = [...this.#handles.values()];
    this.#handles.clear();
    for (const handle of handles) await (await handle.catch(() => undefined))?.close().catch(() => undefined);
  }

  /** Packs are read many times in a row during restore: keep a few file handles open. */
  #handle(name: string): Promise<FileHandle> {
    let handle = this.#handles.get(name);
    if (handle) {
      this.#handles.delete(name);
      this.#handles.set(name, handle);
      return handle;
    }
    handle = fsCall(this.location, () => open(join(this.location, name), 'r'));
    handle.catch(() => this.#handles.delete(name));
    this.#handles.set(name, handle);
    if (this.#handles.size > 32) {
      const [oldest, oldestHandle] = this.#handles.entries().next().value as [string, Promise<FileHandle>];
      this.#handles.delete(oldest);
      void oldestHandle.then((h) => h.close()).catch(() => undefined);
    }
    return handle;
  }
}

async function syncFolder(path: string): Promise<void> {
  const handle = await open(path, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** Turns the file-system errors a user can act on into one clear line. */
async function fsCall<T>(location: string, action: () => Promise<T>): Promise<T> {
  try {
    return await action();
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ENOSPC' || code === 'EDQUOT') {
      throw new SnapshiftError('REPO_DISK_FULL', `no space left on the file system of repository ${location}; nothing was committed, earlier restore points are intact (free space, then run "snapshift gc")`, { cause: error });
    }
    if (code === 'EROFS') throw new SnapshiftError('REPO_READ_ONLY', `repository ${location} is on a read-only file system`, { cause: error });
    throw error;
  }
}
