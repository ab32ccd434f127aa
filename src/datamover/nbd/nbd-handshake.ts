import { SnapshiftError } from '../../core/errors.ts';
import {
  handshakeFlag,
  info,
  isOptionError,
  nbdMagic,
  option,
  optionErrorNames,
  optionErrorUnknownExport,
  optionMagic,
  optionReply,
  optionReplyMagic,
} from './nbd-protocol.ts';

/** Byte-exact reads and writes during negotiation, before the reply parser takes the socket over. */
export interface HandshakeChannel {
  readExactly(length: number): Promise<Buffer>;
  write(bytes: Buffer): void;
}

export interface NegotiatedExport {
  sizeBytes: number;
  transmissionFlags: number;
  structuredReplies: boolean;
  /** Meta context name -> id, as the server granted them. */
  metaContexts: Map<string, number>;
  /** NBD_INFO_BLOCK_SIZE; defaults from the spec when the server sends none. */
  minBlockBytes: number;
  preferredBlockBytes: number;
  maxPayloadBytes: number;
}

/** The spec's default maximum payload when a server states none. */
const defaultMaxPayloadBytes = 32 * 1024 * 1024;

/**
 * Fixed newstyle negotiation: NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT, then NBD_OPT_GO
 * asking for NBD_INFO_BLOCK_SIZE (NBD spec: "Fixed newstyle negotiation", "Option types").
 */
export async function negotiate(channel: HandshakeChannel, exportName: string, wantedContexts: readonly string[], where: string): Promise<NegotiatedExport> {
  const greeting = await channel.readExactly(18);
  if (greeting.readBigUInt64BE(0) !== nbdMagic) {
    throw new SnapshiftError('NBD_HANDSHAKE_FAILED', `${where} is not an NBD server (no NBDMAGIC greeting)`);
  }
  if (greeting.readBigUInt64BE(8) !== optionMagic) {
    throw new SnapshiftError('NBD_HANDSHAKE_FAILED', `${where} speaks oldstyle NBD, which has no export names or structured replies; use a newstyle server`);
  }
  const serverFlags = greeting.readUInt16BE(16);
  if ((serverFlags & handshakeFlag.fixedNewstyle) === 0) {
    throw new SnapshiftError('NBD_HANDSHAKE_FAILED', `${where} does not offer fixed newstyle negotiation`);
  }
  const clientFlags = Buffer.alloc(4);
  clientFlags.writeUInt32BE(handshakeFlag.fixedNewstyle | (serverFlags & handshakeFlag.noZeroes));
  channel.write(clientFlags);

  sendOption(channel, option.structuredReply, Buffer.alloc(0));
  const structured = await readOptionReply(channel, option.structuredReply);
  const structuredReplies = structured.type === optionReply.ack;

  const nameBytes = Buffer.from(exportName, 'utf8');
  const metaContexts = new Map<string, number>();
  if (wantedContexts.length > 0 && structuredReplies) {
    const parts: Buffer[] = [u32(nameBytes.length), nameBytes, u32(wantedContexts.length)];
    for (const context of wantedContexts) {
      const query = Buffer.from(context, 'utf8');
      parts.push(u32(query.length), query);
    }
    sendOption(channel, option.setMetaContext, Buffer.concat(parts));
    for (;;) {
      const reply = await readOptionReply(channel, option.setMetaContext);
      if (reply.type === optionReply.ack) break;
      if (reply.type === optionReply.metaContext && reply.data.length >= 4) {
        metaContexts.set(reply.data.toString('utf8', 4), reply.data.readUInt32BE(0));
      } else if (isOptionError(reply.type)) {
        throw optionFailure(reply, `${where}: NBD_OPT_SET_META_CONTEXT for export "${exportName}"`);
      }
    }
  }

  // NBD_OPT_GO: name, then the info types we want (block size limits; the export info always comes).
  sendOption(channel, option.go, Buffer.concat([u32(nameBytes.length), nameBytes, u16(1), u16(info.blockSize)]));
  const result: NegotiatedExport = {
    sizeBytes: -1,
    transmissionFlags: 0,
    structuredReplies,
    metaContexts,
    minBlockBytes: 1,
    preferredBlockBytes: 4096,
    maxPayloadBytes: defaultMaxPayloadBytes,
  };
  for (;;) {
    const reply = await readOptionReply(channel, option.go);
    if (reply.type === optionReply.ack) break;
    if (isOptionError(reply.type)) {
      if (reply.type === optionErrorUnknownExport) {
        throw new SnapshiftError('NBD_EXPORT_NOT_FOUND', `${where} has no export named "${exportName}"${reply.message ? ` (${reply.message})` : ''}`);
      }
      throw optionFailure(reply, `${where}: NBD_OPT_GO for export "${exportName}"`);
    }
    if (reply.type !== optionReply.info || reply.data.length < 2) continue;
    const infoType = reply.data.readUInt16BE(0);
    if (infoType === info.export && reply.data.length >= 12) {
      result.sizeBytes = Number(reply.data.readBigUInt64BE(2));
      result.transmissionFlags = reply.data.readUInt16BE(10);
    } else if (infoType === info.blockSize && reply.data.length >= 14) {
      result.minBlockBytes = reply.data.readUInt32BE(2);
      result.preferredBlockBytes = reply.data.readUInt32BE(6);
      result.maxPayloadBytes = reply.data.readUInt32BE(10);
    }
  }
  if (result.sizeBytes < 0) throw new SnapshiftError('NBD_HANDSHAKE_FAILED', `${where} accepted export "${exportName}" without telling its size`);
  return result;
}

interface OptionReply {
  type: number;
  data: Buffer;
  message: string;
}

function sendOption(channel: HandshakeChannel, optionType: number, data: Buffer): void {
  const header = Buffer.alloc(16);
  header.writeBigUInt64BE(optionMagic, 0);
  header.writeUInt32BE(optionType, 8);
  header.writeUInt32BE(data.length, 12);
  channel.write(data.length > 0 ? Buffer.concat([header, data]) : header);
}

async function readOptionReply(channel: HandshakeChannel, optionType: number): Promise<OptionReply> {
  const header = await channel.readExactly(20);
  if (header.readBigUInt64BE(0) !== optionReplyMagic) throw new SnapshiftError('NBD_PROTOCOL_ERROR', 'NBD server sent a bad option reply magic');
  if (header.readUInt32BE(8) !== optionType) throw new SnapshiftError('NBD_PROTOCOL_ERROR', `NBD server answered option ${header.readUInt32BE(8)} while we asked ${optionType}`);
  const type = header.readUInt32BE(12);
  const length = header.readUInt32BE(16);
  if (length > 16 * 1024 * 1024) throw new SnapshiftError('NBD_PROTOCOL_ERROR', `NBD server sent an option reply of ${length} bytes`);
  const data = length > 0 ? await channel.readExactly(length) : Buffer.alloc(0);
  return { type, data, message: isOptionError(type) ? data.toString('utf8') : '' };
}

function optionFailure(reply: OptionReply, what: string): SnapshiftError {
  const name = optionErrorNames[reply.type] ?? `error 0x${reply.type.toString(16)}`;
  return new SnapshiftError('NBD_HANDSHAKE_FAILED', `${what} failed: ${name}${reply.message ? ` (${reply.message})` : ''}`);
}

function u32(value: number): Buffer {
  const bytes = Buffer.alloc(4);
  bytes.writeUInt32BE(value);
  return bytes;
}

function u16(value: number): Buffer {
  const bytes = Buffer.alloc(2);
  bytes.writeUInt16BE(value);
  return bytes;
}
