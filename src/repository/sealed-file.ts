import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { Blake3Hasher } from '@napi-rs/blake-hash';
import { compress, decompress } from 'zstd-napi';
import { SnapshiftError } from '../core/errors.ts';
import type { RepositoryKeys } from './repository-keys.ts';

/** Types of sealed files (docs/FORMAT.md § Sealed files). */
export const SealedType = { index: 1, manifestHeader: 2, manifestMaps: 3, packTrailer: 4 } as const;
export type SealedType = (typeof SealedType)[keyof typeof SealedType];

const magic = Buffer.from('SNSF');
const flagEncrypted = 1;
const flagCompressed = 2;

/** Encrypts (or checksums) `body` into the sealed-file envelope. */
export function seal(keys: RepositoryKeys, type: SealedType, body: Buffer, compressBody = false): Buffer {
  const payload = compressBody ? compress(body, { compressionLevel: 3 }) : body;
  const header = Buffer.alloc(8);
  magic.copy(header, 0);
  header[4] = 1;
  header[5] = type;
  header[6] = (keys.dataKey ? flagEncrypted : 0) | (compressBody ? flagCompressed : 0);
  if (keys.dataKey) {
    const nonce = randomBytes(12);
    const cipher = createCipheriv('aes-256-gcm', keys.dataKey, nonce);
    cipher.setAAD(header);
    return Buffer.concat([header, nonce, cipher.update(payload), cipher.final(), cipher.getAuthTag()]);
  }
  return Buffer.concat([header, payload, checksum(keys, header, payload)]);
}

/** Opens a sealed file; `what` names it in the error a damaged file gives. */
export function unseal(keys: RepositoryKeys, type: SealedType, sealed: Buffer, what: string): Buffer {
  const damaged = (reason: string): SnapshiftError => new SnapshiftError('REPO_FILE_DAMAGED', `${what} is damaged (${reason})`);
  if (sealed.length < 24 || !sealed.subarray(0, 4).equals(magic)) throw damaged('bad magic or too short');
  if (sealed[4] !== 1) throw damaged(`unknown sealed-file version ${sealed[4]}`);
  if (sealed[5] !== type) throw damaged(`wrong file type ${sealed[5]}, expected ${type}`);
  const flags = sealed[6]!;
  const header = sealed.subarray(0, 8);
  let payload: Buffer;
  if (flags & flagEncrypted) {
    if (!keys.dataKey) throw damaged('encrypted, but the repository is not');
    const decipher = createDecipheriv('aes-256-gcm', keys.dataKey, sealed.subarray(8, 20));
    decipher.setAAD(header);
    decipher.setAuthTag(sealed.subarray(sealed.length - 16));
    try {
      payload = Buffer.concat([decipher.update(sealed.subarray(20, sealed.length - 16)), decipher.final()]);
    } catch {
      throw damaged('authentication failed');
    }
  } else {
    if (keys.dataKey) throw damaged('not encrypted, but the repository is');
    payload = sealed.subarray(8, sealed.length - 16);
    if (!checksum(keys, header, payload).equals(sealed.subarray(sealed.length - 16))) throw damaged('checksum mismatch');
  }
  if (flags & flagCompressed) {
    try {
      return decompress(payload);
    } catch {
      throw damaged('bad compressed body');
    }
  }
  return payload;
}

function checksum(keys: RepositoryKeys, header: Buffer, payload: Buffer): Buffer {
  return Blake3Hasher.newKeyed(keys.checksumKey).update(header).update(payload).digestBuffer().subarray(0, 16);
}
