import { createCipheriv, createDecipheriv, randomBytes, scrypt as scryptCallback, type ScryptOptions } from 'node:crypto';
import { hostname, userInfo } from 'node:os';
import { Blake3Hasher } from '@napi-rs/blake-hash';
import { SnapshiftError } from '../core/errors.ts';

/** The keys a repository's data is protected with (docs/FORMAT.md § Keys). */
export interface RepositoryKeys {
  /** AES-256-GCM key for blobs and sealed files; undefined in an unencrypted repository. */
  readonly dataKey: Buffer | undefined;
  /** BLAKE3 key for chunk ids. */
  readonly idKey: Buffer;
  /** Key of the checksum that unencrypted sealed files carry instead of a GCM tag. */
  readonly checksumKey: Buffer;
}

export interface KeySlot {
  version: 1;
  kdf: 'scrypt';
  N: number;
  r: number;
  p: number;
  salt: string;
  nonce: string;
  wrappedKey: string;
  createdAt: string;
  host: string;
  user: string;
}

/** scrypt cost: 32 MiB and ~0.1 s per attempt (docs/FORMAT.md § Keys). */
export const scryptParameters = { N: 32768, r: 8, p: 1 } as const;
const wrapAad = Buffer.from('snapshift-key-v1');

export function keysFromMaster(master: Buffer, encrypted: boolean): RepositoryKeys {
  const idKey = master.subarray(32, 64);
  return {
    dataKey: encrypted ? master.subarray(0, 32) : undefined,
    idKey,
    checksumKey: Blake3Hasher.deriveKey('snapshift v1 sealed-file checksum', idKey),
  };
}

export function newMasterKey(): Buffer {
  return randomBytes(64);
}

function scrypt(password: string, salt: Buffer, slot: { N: number; r: number; p: number }): Promise<Buffer> {
  const options: ScryptOptions = { N: slot.N, r: slot.r, p: slot.p, maxmem: 256 * slot.N * slot.r + 1024 * 1024 };
  return new Promise((resolve, reject) => scryptCallback(password, salt, 32, options, (error, key) => (error ? reject(error) : resolve(key))));
}

/** Wraps the master key with a key derived from `password`. */
export async function makeKeySlot(master: Buffer, password: string): Promise<KeySlot> {
  const salt = randomBytes(32);
  const nonce = randomBytes(12);
  const wrapKey = await scrypt(password, salt, scryptParameters);
  const cipher = createCipheriv('aes-256-gcm', wrapKey, nonce);
  cipher.setAAD(wrapAad);
  const wrapped = Buffer.concat([cipher.update(master), cipher.final(), cipher.getAuthTag()]);
  return {
    version: 1,
    kdf: 'scrypt',
    ...scryptParameters,
    salt: salt.toString('base64'),
    nonce: nonce.toString('base64'),
    wrappedKey: wrapped.toString('base64'),
    createdAt: new Date().toISOString(),
    host: hostname(),
    user: safeUser(),
  };
}

/** The master key if `password` opens this slot, else undefined. */
export async function openKeySlot(slot: KeySlot, password: string): Promise<Buffer | undefined> {
  const wrapKey = await scrypt(password, Buffer.from(slot.salt, 'base64'), slot);
  const wrapped = Buffer.from(slot.wrappedKey, 'base64');
  const decipher = createDecipheriv('aes-256-gcm', wrapKey, Buffer.from(slot.nonce, 'base64'));
  decipher.setAAD(wrapAad);
  decipher.setAuthTag(wrapped.subarray(wrapped.length - 16));
  try {
    return Buffer.concat([decipher.update(wrapped.subarray(0, wrapped.length - 16)), decipher.final()]);
  } catch {
    return undefined;
  }
}

/** Checks a key slot read from disk (input at the edge). */
export function parseKeySlot(text: string, name: string): KeySlot {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    throw new SnapshiftError('REPO_KEY_DAMAGED', `key slot ${name} is not valid JSON`);
  }
  const slot = value as Partial<KeySlot>;
  if (slot.kdf !== 'scrypt' || typeof slot.N !== 'number' || typeof slot.r !== 'number' || typeof slot.p !== 'number' || typeof slot.salt !== 'string' || typeof slot.nonce !== 'string' || typeof slot.wrappedKey !== 'string') {
    throw new SnapshiftError('REPO_KEY_DAMAGED', `key slot ${name} is damaged or of an unknown kind`);
  }
  return slot as KeySlot;
}

function safeUser(): string {
  try {
    return userInfo().username;
  } catch {
    return String(process.getuid?.() ?? 'unknown');
  }
}
