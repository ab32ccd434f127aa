/**
 * Wire constants of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md). Everything is big-endian.
 */

// Handshake (fixed newstyle).
export const nbdMagic = 0x4e42444d41474943n; // "NBDMAGIC"
export const optionMagic = 0x49484156454f5054n; // "IHAVEOPT"; oldstyle servers send 0x00420281861253 here
export const optionReplyMagic = 0x0003e889045565a9n;
export const handshakeFlag = { fixedNewstyle: 1, noZeroes: 2 } as const;

export const option = { exportName: 1, abort: 2, list: 3, info: 6, go: 7, structuredReply: 8, listMetaContext: 9, setMetaContext: 10 } as const;

// Option reply types; errors have bit 31 set.
export const optionReply = { ack: 1, server: 2, info: 3, metaContext: 4 } as const;
const errorBit = 0x8000_0000;
export const optionErrorNames: Record<number, string> = {
  [errorBit + 1]: 'NBD_REP_ERR_UNSUP',
  [errorBit + 2]: 'NBD_REP_ERR_POLICY',
  [errorBit + 3]: 'NBD_REP_ERR_INVALID',
  [errorBit + 4]: 'NBD_REP_ERR_PLATFORM',
  [errorBit + 5]: 'NBD_REP_ERR_TLS_REQD',
  [errorBit + 6]: 'NBD_REP_ERR_UNKNOWN',
  [errorBit + 7]: 'NBD_REP_ERR_SHUTDOWN',
  [errorBit + 8]: 'NBD_REP_ERR_BLOCK_SIZE_REQD',
  [errorBit + 9]: 'NBD_REP_ERR_TOO_BIG',
};
export const optionErrorUnknownExport = errorBit + 6;
export const optionErrorUnsupported = errorBit + 1;
export const optionErrorPolicy = errorBit + 2;
export const optionErrorInvalid = errorBit + 3;
export const optionErrorTooBig = errorBit + 9;
export function isOptionError(replyType: number): boolean {
  return replyType >= errorBit;
}

// NBD_REP_INFO payload types.
export const info = { export: 0, name: 1, description: 2, blockSize: 3 } as const;

// Transmission flags (NBD_FLAG_*), sent with NBD_INFO_EXPORT.
export const transmissionFlag = {
  hasFlags: 1 << 0,
  readOnly: 1 << 1,
  sendFlush: 1 << 2,
  sendFua: 1 << 3,
  rotational: 1 << 4,
  sendTrim: 1 << 5,
  sendWriteZeroes: 1 << 6,
  sendDf: 1 << 7,
  canMultiConn: 1 << 8,
  sendResize: 1 << 9,
  sendCache: 1 << 10,
  sendFastZero: 1 << 11,
} as const;

// Transmission phase.
export const requestMagic = 0x25609513;
export const simpleReplyMagic = 0x67446698;
export const structuredReplyMagic = 0x668e33ef;
export const requestHeaderBytes = 28;
export const simpleReplyHeaderBytes = 16;
export const structuredReplyHeaderBytes = 20;

export const command = { read: 0, write: 1, disconnect: 2, flush: 3, trim: 4, cache: 5, writeZeroes: 6, blockStatus: 7 } as const;
export const commandFlag = { fua: 1, noHole: 2, df: 4, reqOne: 8, fastZero: 16 } as const;

export const replyFlagDone = 1;
export const chunkType = { none: 0, offsetData: 1, offsetHole: 2, blockStatus: 5, error: 0x8001, errorOffset: 0x8002 } as const;
export function isErrorChunk(type: number): boolean {
  return (type & 0x8000) !== 0;
}

// Error values on the wire (Linux errno numbers, whatever the platform).
export const nbdErrno = { eperm: 1, eio: 5, enomem: 12, einval: 22, enospc: 28, eoverflow: 75, enotsup: 95, eshutdown: 108 } as const;
export const errorNames: Record<number, string> = {
  1: 'EPERM',
  5: 'EIO',
  12: 'ENOMEM',
  22: 'EINVAL',
  28: 'ENOSPC',
  75: 'EOVERFLOW',
  95: 'ENOTSUP',
  108: 'ESHUTDOWN',
};

// Meta context "base:allocation" flags.
export const allocationFlag = { hole: 1, zero: 2 } as const;
// Meta context "qemu:dirty-bitmap:NAME" flag.
export const dirtyFlag = 1;
