// EST (RFC 7030) client for devices: the wire side of the device SDK.
//
// One TLS connection at a time, kept alive between requests (Connection: keep-alive over a socket
// this client owns, so it knows exactly which connection a request goes on). The server's certificate
// is verified against the pinned roots ONLY (never the system store) and against the host name.
//
// Channel binding (RFC 7030 §3.5): the CSR's challengePassword must carry the binding of the TLS
// connection that sends it, so the CSR can only be made once that connection is up.
// enrollWithBinding() does exactly that: it opens (or reuses) the connection, reads its tls-unique
// (TLS 1.2) or tls-exporter (TLS 1.3) value, calls back to make the CSR, and posts it on that same
// socket — or fails, never silently sending it on another connection.
//
// Errors: every failure is an EstClientError with `status` (the HTTP status; 0 when there was no
// HTTP answer) and `code` (the server's error code from its "CODE: message" body, or an EST_* code
// for client-side failures: timeout, connection, untrusted server, oversized or malformed answer).

import { X509Certificate, type KeyObject } from 'node:crypto';
import { request as httpRequest, type IncomingHttpHeaders } from 'node:http';
import { isIP } from 'node:net';
import { connect as tlsConnect, createSecureContext, type SecureContext, type SecureContextOptions, type TLSSocket } from 'node:tls';
import { decodePemBlocks } from '../pki/pem.js';
import {
  clientChannelBinding,
  decodeBase64Body,
  decodeCertsOnly,
  decodeCsrAttrs,
  encodeBase64Body,
  parseServerKeygenResponse,
  type ChannelBinding,
  type CsrAttr,
} from '../protocols/est/wire.js';
import type { TlsKeyCredentials } from './device-key.js';

export type { ChannelBinding, CsrAttr };

/** Client-side failure codes (the server's own codes are passed through as they come). */
export type EstClientFailure =
  | 'EST_TIMEOUT'
  | 'EST_CONNECTION_FAILED'
  | 'EST_CONNECTION_LOST'
  | 'EST_SERVER_UNTRUSTED'
  | 'EST_TLS_FAILED'
  | 'EST_RESPONSE_TOO_LARGE'
  | 'EST_BAD_RESPONSE'
  | 'EST_PENDING'
  | 'EST_BAD_OPTIONS'
  | 'EST_CA_UNTRUSTED'
  | 'EST_CERT_INVALID';

export class EstClientError extends Error {
  /** The server's error code (e.g. CLAIM_INVALID, CHANNEL_BINDING_MISMATCH), or an EST_* client-side code. */
  readonly code: string;
  /** HTTP status of the answer; 0 when there was none. */
  readonly status: number;
  /** The server's message, as it sent it (control characters removed, at most 1000 characters). */
  readonly serverMessage?: string;
  /** Retry-After of a 429 or 202 answer, in seconds. */
  readonly retryAfterSeconds?: number;

  constructor(code: string, message: string, options: { status?: number; serverMessage?: string; retryAfterSeconds?: number; cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'EstClientError';
    this.code = code;
    this.status = options.status ?? 0;
    if (options.serverMessage !== undefined) this.serverMessage = options.serverMessage;
    if (options.retryAfterSeconds !== undefined) this.retryAfterSeconds = options.retryAfterSeconds;
  }
}

export interface EstClientOptions {
  /** https://host[:port] of the Hallmark server (the EST path is /.well-known/est). */
  readonly server: string | URL;
  /** PEM certificate(s) to pin: the server's TLS certificate must chain to one of these, and to nothing else. */
  readonly trust: string | Buffer | readonly (string | Buffer)[];
  /** EST label: a product or line name (/.well-known/est/<label>/…). */
  readonly label?: string;
  /** TLS client certificate, PEM, leaf first then any intermediates. Needs clientKey. */
  readonly clientCert?: string | Buffer;
  /** The client certificate's key: a KeyObject, PEM, or a key in a token through an OpenSSL engine (DeviceKey.tlsCredentials()). */
  readonly clientKey?: KeyObject | string | Buffer | TlsKeyCredentials;
  /** HTTP Basic credentials "id:secret" (a Hallmark claim), sent with enrolment requests only. */
  readonly basic?: string;
  /** Per request (connect included). Default 30 s. */
  readonly timeoutMs?: number;
  /** Largest response body accepted, bytes. Default 1 MiB. */
  readonly maxResponseBytes?: number;
  readonly minVersion?: 'TLSv1.2' | 'TLSv1.3';
  readonly maxVersion?: 'TLSv1.2' | 'TLSv1.3';
  /** TLS server name to check (and send as SNI); default the URL's host name. */
  readonly servername?: string;
}

/** What an enrolment answered: the issued certificate and every certificate the certs-only response held. */
export interface EstIssued {
  readonly certificate: Buffer;
  readonly certificates: readonly Buffer[];
}

export type EstEnrolOperation = 'simpleenroll' | 'simplereenroll' | 'serverkeygen';

export const DEFAULT_TIMEOUT_MS = 30_000;
export const DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024;
const LABEL = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

const UNTRUSTED = new Set([
  'UNABLE_TO_GET_ISSUER_CERT', 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY', 'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT', 'CERT_HAS_EXPIRED', 'CERT_NOT_YET_VALID', 'CERT_SIGNATURE_FAILURE', 'CERT_UNTRUSTED', 'CERT_REJECTED',
  'ERR_TLS_CERT_ALTNAME_INVALID', 'INVALID_CA', 'PATH_LENGTH_EXCEEDED', 'INVALID_PURPOSE',
]);
const CONNECTION = new Set(['ECONNREFUSED', 'ECONNRESET', 'EHOSTUNREACH', 'ENETUNREACH', 'ENOTFOUND', 'EAI_AGAIN', 'EPIPE', 'ETIMEDOUT']);

/** Server text made safe to show: no control characters, bounded. */
function clean(text: string, max = 1000): string {
  // eslint-disable-next-line no-control-regex
  const s = text.replace(/[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/g, '').trim();
  return s.length > max ? `${s.slice(0, max)}…` : s;
}

function mapTransportError(err: unknown, what: string): EstClientError {
  if (err instanceof EstClientError) return err;
  const e = err as { code?: string; message?: string };
  const code = e?.code ?? '';
  if (UNTRUSTED.has(code)) return new EstClientError('EST_SERVER_UNTRUSTED', `${what}: the server's TLS certificate is not trusted (${code}: ${e.message}); it must chain to the pinned root`, { cause: err });
  if (CONNECTION.has(code)) return new EstClientError('EST_CONNECTION_FAILED', `${what}: ${code} ${e.message ?? ''}`.trim(), { cause: err });
  if (/^ERR_SSL_|^ERR_TLS_/.test(code) || /ssl|tls|alert/i.test(e?.message ?? '')) return new EstClientError('EST_TLS_FAILED', `${what}: TLS failed: ${e.message}`, { cause: err });
  return new EstClientError('EST_CONNECTION_FAILED', `${what}: ${e?.message ?? String(err)}`, { cause: err });
}

/** One TLS connection and what happened to it. */
class Connection {
  readonly socket: TLSSocket;
  #closed = false;
  /** Requests completed on it (a failed request on a reused connection may be retried when idempotent). */
  used = 0;

  constructor(socket: TLSSocket) {
    this.socket = socket;
    socket.on('close', () => { this.#closed = true; });
    // While idle no HTTP request listens on the socket; an error then just ends the connection.
    socket.on('error', () => { this.#closed = true; });
    socket.unref();
  }

  get usable(): boolean {
    return !this.#closed && !this.socket.destroyed && this.socket.writable;
  }

  destroy(): void {
    this.#closed = true;
    this.socket.destroy();
  }
}

interface Exchange {
  readonly status: number;
  readonly headers: IncomingHttpHeaders;
  readonly body: Buffer;
}

export class EstClient {
  readonly #url: URL;
  readonly #host: string;
  readonly #port: number;
  readonly #servername: string | undefined;
  readonly #label: string | undefined;
  readonly #basic: string | undefined;
  readonly #timeoutMs: number;
  readonly #maxBytes: number;
  readonly #context: SecureContext;
  readonly #roots: readonly X509Certificate[];
  #connection: Connection | undefined;
  /** Requests run one at a time on the one connection. */
  #queue: Promise<unknown> = Promise.resolve();
  #closed = false;

  constructor(options: EstClientOptions) {
    const url = new URL(String(options.server));
    if (url.protocol !== 'https:') throw new EstClientError('EST_BAD_OPTIONS', `the EST server must be an https:// URL, not ${url.protocol}`);
    if (url.username || url.password) throw new EstClientError('EST_BAD_OPTIONS', 'put claim credentials in the basic option, not in the URL');
    this.#url = url;
    this.#host = url.hostname.replace(/^\[|\]$/g, '');
    this.#port = url.port ? Number(url.port) : 443;
    this.#servername = options.servername ?? (isIP(this.#host) ? undefined : this.#host);
    if (options.label !== undefined && !LABEL.test(options.label)) throw new EstClientError('EST_BAD_OPTIONS', `bad EST label ${JSON.stringify(options.label)}`);
    this.#label = options.label;
    if (options.basic !== undefined) {
      if (!options.basic.includes(':') || /[\r\n]/.test(options.basic)) throw new EstClientError('EST_BAD_OPTIONS', 'basic credentials must be "id:secret"');
      this.#basic = `Basic ${Buffer.from(options.basic, 'utf8').toString('base64')}`;
    }
    this.#timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.#maxBytes = options.maxResponseBytes ?? DEFAULT_MAX_RESPONSE_BYTES;

    const trust = (Array.isArray(options.trust) ? options.trust : [options.trust]) as (string | Buffer)[];
    const roots: X509Certificate[] = [];
    for (const t of trust) {
      const text = Buffer.isBuffer(t) ? t.toString('utf8') : t;
      let blocks;
      try {
        blocks = decodePemBlocks(text, 512 * 1024);
      } catch (err) {
        throw new EstClientError('EST_BAD_OPTIONS', `the trust anchors are not PEM certificates: ${(err as Error).message}`, { cause: err });
      }
      for (const b of blocks) {
        if (b.label !== 'CERTIFICATE') throw new EstClientError('EST_BAD_OPTIONS', `the trust anchors must be CERTIFICATE blocks, found ${b.label}`);
        roots.push(new X509Certificate(b.der));
      }
    }
    if (roots.length === 0) throw new EstClientError('EST_BAD_OPTIONS', 'no trust anchor given: pin the Hallmark root certificate');
    this.#roots = roots;

    const ctx: SecureContextOptions = {
      // Replaces Node's default root store: the pinned roots and nothing else.
      ca: roots.map((r) => r.toString()),
      minVersion: options.minVersion ?? 'TLSv1.2',
      maxVersion: options.maxVersion ?? 'TLSv1.3',
    };
    if (options.clientCert !== undefined) {
      if (options.clientKey === undefined) throw new EstClientError('EST_BAD_OPTIONS', 'a client certificate needs its key (clientKey)');
      ctx.cert = options.clientCert;
      const k = options.clientKey;
      if (typeof k === 'object' && !Buffer.isBuffer(k) && 'privateKeyEngine' in k) {
        ctx.privateKeyEngine = k.privateKeyEngine;
        ctx.privateKeyIdentifier = k.privateKeyIdentifier;
      } else if (typeof k === 'object' && !Buffer.isBuffer(k) && 'key' in k) {
        ctx.key = exportKey(k.key);
      } else {
        ctx.key = typeof k === 'string' || Buffer.isBuffer(k) ? k : exportKey(k as KeyObject);
      }
    } else if (options.clientKey !== undefined) {
      throw new EstClientError('EST_BAD_OPTIONS', 'a client key needs its certificate (clientCert)');
    }
    try {
      this.#context = createSecureContext(ctx);
    } catch (err) {
      throw new EstClientError('EST_BAD_OPTIONS', `cannot set up TLS: ${(err as Error).message}`, { cause: err });
    }
  }

  /** The pinned trust anchors. */
  get trustAnchors(): readonly X509Certificate[] {
    return this.#roots;
  }

  /** The negotiated TLS version of the current connection ('TLSv1.2', 'TLSv1.3'), if one is open. */
  get protocol(): string | undefined {
    return this.#connection?.usable ? this.#connection.socket.getProtocol() ?? undefined : undefined;
  }

  /** GET cacerts: the CA certificates (DER, in the server's order). Not verified here: see agent.ts. */
  async cacerts(): Promise<Buffer[]> {
    const r = await this.#locked(() => this.#request('GET', 'cacerts', { idempotent: true }));
    this.#expectType(r, 'application/pkcs7-mime', 'cacerts');
    return this.#certs(this.#base64(r), 'cacerts');
  }

  /** GET csrattrs: what the server wants in the CSR ([] when it answers 204). */
  async csrattrs(): Promise<CsrAttr[]> {
    const r = await this.#locked(() => this.#request('GET', 'csrattrs', { idempotent: true }));
    if (r.status === 204 || r.body.length === 0) return [];
    this.#expectType(r, 'application/csrattrs', 'csrattrs');
    try {
      return decodeCsrAttrs(this.#base64(r));
    } catch (err) {
      if (err instanceof EstClientError) throw err;
      throw new EstClientError('EST_BAD_RESPONSE', `csrattrs: ${(err as Error).message}`, { cause: err });
    }
  }

  async simpleEnroll(csrDer: Buffer): Promise<EstIssued> {
    return this.#issued(await this.#locked(() => this.#post('simpleenroll', csrDer)), 'simpleenroll');
  }

  async simpleReenroll(csrDer: Buffer): Promise<EstIssued> {
    return this.#issued(await this.#locked(() => this.#post('simplereenroll', csrDer)), 'simplereenroll');
  }

  async serverKeygen(csrDer: Buffer): Promise<EstIssued & { privateKeyPkcs8: Buffer }> {
    const r = await this.#locked(() => this.#post('serverkeygen', csrDer));
    return this.#keygen(r);
  }

  /** The channel binding of the current connection (opened if needed); undefined when the TLS stack cannot give one. */
  async channelBinding(): Promise<ChannelBinding | undefined> {
    return this.#locked(async () => clientChannelBinding((await this.#open()).socket));
  }

  /**
   * Opens (or reuses) the connection, reads its channel binding, lets `makeCsr` build the CSR with it
   * (put base64(binding.value) into the challengePassword), and posts the CSR on that same connection.
   * If the connection is gone before the CSR could be sent, a new connection is opened and the CSR
   * made again for it (once); a CSR is never sent on a connection other than the one it was made for.
   */
  async enrollWithBinding(makeCsr: (binding: ChannelBinding) => Promise<Buffer>, operation: EstEnrolOperation = 'simpleenroll'): Promise<EstIssued & { privateKeyPkcs8?: Buffer; channelBinding: ChannelBinding['type'] }> {
    const r = await this.#locked(async () => {
      for (let attempt = 0; ; attempt++) {
        const conn = await this.#open();
        const binding = clientChannelBinding(conn.socket);
        if (!binding) throw new EstClientError('EST_TLS_FAILED', `no channel binding is available on this ${conn.socket.getProtocol() ?? 'TLS'} connection`);
        const csr = await makeCsr(binding);
        if (!conn.usable) {
          if (attempt === 0) continue;
          throw new EstClientError('EST_CONNECTION_LOST', 'the TLS connection closed before the CSR bound to it could be sent');
        }
        const exchange = await this.#request('POST', operation, { body: csr, connection: conn });
        return { exchange, type: binding.type };
      }
    });
    const issued = operation === 'serverkeygen' ? await this.#keygen(r.exchange) : this.#issued(r.exchange, operation);
    return { ...issued, channelBinding: r.type };
  }

  /** Closes the connection. The client can still be used afterwards (it reconnects). */
  close(): void {
    this.#connection?.destroy();
    this.#connection = undefined;
  }

  /** Closes for good. */
  destroy(): void {
    this.#closed = true;
    this.close();
  }

  // ---------------------------------------------------------------- internals

  #locked<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#queue.then(fn, fn);
    this.#queue = run.catch(() => undefined);
    return run;
  }

  #path(operation: string): string {
    const base = this.#url.pathname.replace(/\/+$/, '');
    return `${base}/.well-known/est${this.#label !== undefined ? `/${this.#label}` : ''}/${operation}`;
  }

  async #open(): Promise<Connection> {
    if (this.#closed) throw new EstClientError('EST_BAD_OPTIONS', 'the EST client was destroyed');
    if (this.#connection?.usable) return this.#connection;
    this.#connection = undefined;
    const what = `connecting to ${this.#url.host}`;
    const socket = await new Promise<TLSSocket>((resolve, reject) => {
      const s = tlsConnect({ host: this.#host, port: this.#port, servername: this.#servername, secureContext: this.#context, rejectUnauthorized: true });
      const timer = setTimeout(() => s.destroy(new EstClientError('EST_TIMEOUT', `${what}: no TLS connection within ${this.#timeoutMs} ms`)), this.#timeoutMs);
      s.once('secureConnect', () => {
        clearTimeout(timer);
        s.removeListener('error', onError);
        resolve(s);
      });
      const onError = (err: Error): void => {
        clearTimeout(timer);
        s.destroy();
        reject(mapTransportError(err, what));
      };
      s.once('error', onError);
    });
    this.#connection = new Connection(socket);
    return this.#connection;
  }

  #post(operation: EstEnrolOperation, csrDer: Buffer): Promise<Exchange> {
    return this.#request('POST', operation, { body: csrDer });
  }

  async #request(method: 'GET' | 'POST', operation: string, options: { body?: Buffer; idempotent?: boolean; connection?: Connection }): Promise<Exchange> {
    const conn = options.connection ?? (await this.#open());
    try {
      return await this.#exchange(conn, method, operation, options.body);
    } catch (err) {
      // A keep-alive connection the server closed while idle: retry a GET once on a new connection.
      if (options.idempotent && !options.connection && conn.used > 0 && err instanceof EstClientError && err.code === 'EST_CONNECTION_LOST') {
        return this.#exchange(await this.#open(), method, operation, options.body);
      }
      throw err;
    }
  }

  #exchange(conn: Connection, method: 'GET' | 'POST', operation: string, csrDer?: Buffer): Promise<Exchange> {
    const what = `${method} ${operation}`;
    if (!conn.usable) return Promise.reject(new EstClientError('EST_CONNECTION_LOST', `${what}: the connection is closed`));
    const headers: Record<string, string> = { connection: 'keep-alive', 'cache-control': 'no-store' };
    let payload: string | undefined;
    if (method === 'POST') {
      payload = encodeBase64Body(csrDer!);
      headers['content-type'] = 'application/pkcs10';
      headers['content-transfer-encoding'] = 'base64';
      headers['content-length'] = String(Buffer.byteLength(payload));
      if (this.#basic && operation !== 'simplereenroll') headers.authorization = this.#basic;
    }
    return new Promise<Exchange>((resolve, reject) => {
      let settled = false;
      let gotResponse = false;
      const socket = conn.socket;
      socket.ref();
      const settle = (err: unknown, value?: Exchange): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        socket.unref();
        if (err) {
          conn.destroy(); // a request that failed half-way leaves the connection in an unknown state
          reject(err);
        } else {
          conn.used++;
          resolve(value!);
        }
      };
      const timer = setTimeout(() => {
        settle(new EstClientError('EST_TIMEOUT', `${what}: no complete answer within ${this.#timeoutMs} ms`));
        req.destroy();
      }, this.#timeoutMs);
      const req = httpRequest({
        host: this.#host,
        port: this.#port,
        method,
        path: this.#path(operation),
        headers,
        createConnection: () => socket,
      });
      req.on('response', (res) => {
        gotResponse = true;
        const declared = Number(res.headers['content-length'] ?? 0);
        const limit = this.#encodedLimit();
        if (declared > limit) {
          res.destroy();
          settle(new EstClientError('EST_RESPONSE_TOO_LARGE', `${what}: the answer is ${declared} bytes, over the ${limit}-byte limit`, { status: res.statusCode ?? 0 }));
          return;
        }
        const chunks: Buffer[] = [];
        let size = 0;
        res.on('data', (c: Buffer) => {
          size += c.length;
          if (size > limit) {
            res.destroy();
            settle(new EstClientError('EST_RESPONSE_TOO_LARGE', `${what}: the answer is over the ${limit}-byte limit`, { status: res.statusCode ?? 0 }));
            return;
          }
          chunks.push(c);
        });
        res.on('end', () => settle(null, { status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }));
        res.on('error', (err) => settle(mapTransportError(err, what)));
        res.on('aborted', () => settle(new EstClientError('EST_CONNECTION_LOST', `${what}: the connection closed in the middle of the answer`)));
      });
      req.on('error', (err) => {
        const e = err as NodeJS.ErrnoException;
        if (!gotResponse && (e.code === 'ECONNRESET' || /socket hang up/.test(e.message))) {
          settle(new EstClientError('EST_CONNECTION_LOST', `${what}: the server closed the connection without answering`, { cause: err }));
        } else {
          settle(mapTransportError(err, what));
        }
      });
      req.end(payload);
    });
  }

  /** Base64 text is 4/3 of the DER plus line breaks; allow that for the configured DER limit. */
  #encodedLimit(): number {
    return Math.ceil(this.#maxBytes / 3) * 4 * 2 + 4096;
  }

  /** Throws the server's error for anything but 200 (and 204 where the caller handles it). */
  #check(r: Exchange, what: string): void {
    if (r.status === 200 || r.status === 204) return;
    const retry = Number(r.headers['retry-after']);
    const retryAfterSeconds = Number.isFinite(retry) && retry >= 0 ? retry : undefined;
    if (r.status === 202) throw new EstClientError('EST_PENDING', `${what}: the request is pending approval${retryAfterSeconds !== undefined ? `; retry after ${retryAfterSeconds} s` : ''}`, { status: 202, retryAfterSeconds });
    const text = clean(r.body.subarray(0, 4096).toString('utf8'));
    const m = /^([A-Z][A-Z0-9_]{1,63}): ([\s\S]*)$/.exec(text);
    const code = m ? m[1]! : `HTTP_${r.status}`;
    const serverMessage = m ? m[2]! : text;
    throw new EstClientError(code, `${what}: ${serverMessage || `HTTP ${r.status}`}`, { status: r.status, serverMessage, retryAfterSeconds });
  }

  #expectType(r: Exchange, type: string, what: string): void {
    this.#check(r, what);
    const got = String(r.headers['content-type'] ?? '').split(';')[0]!.trim().toLowerCase();
    if (got !== type) throw new EstClientError('EST_BAD_RESPONSE', `${what}: the answer is ${got || 'untyped'}, not ${type}`, { status: r.status });
  }

  #base64(r: Exchange): Buffer {
    try {
      return decodeBase64Body(r.body, this.#maxBytes);
    } catch (err) {
      if ((err as { code?: string }).code === 'INPUT_TOO_LARGE') throw new EstClientError('EST_RESPONSE_TOO_LARGE', `the answer is too large: ${(err as Error).message}`, { status: r.status, cause: err });
      throw new EstClientError('EST_BAD_RESPONSE', `the answer is not base64 DER: ${(err as Error).message}`, { status: r.status, cause: err });
    }
  }

  #issued(r: Exchange, what: string): EstIssued {
    this.#expectType(r, 'application/pkcs7-mime', what);
    return pickLeaf(this.#certs(this.#base64(r), what), what);
  }

  #certs(der: Buffer, what: string): Buffer[] {
    try {
      return decodeCertsOnly(der, this.#maxBytes);
    } catch (err) {
      if ((err as { code?: string }).code === 'INPUT_TOO_LARGE') throw new EstClientError('EST_RESPONSE_TOO_LARGE', `${what}: ${(err as Error).message}`, { cause: err });
      throw new EstClientError('EST_BAD_RESPONSE', `${what}: the answer is not a certs-only CMS: ${(err as Error).message}`, { cause: err });
    }
  }

  async #keygen(r: Exchange): Promise<EstIssued & { privateKeyPkcs8: Buffer }> {
    this.#check(r, 'serverkeygen');
    let parsed;
    try {
      parsed = parseServerKeygenResponse(String(r.headers['content-type'] ?? ''), r.body, this.#encodedLimit());
    } catch (err) {
      throw new EstClientError('EST_BAD_RESPONSE', `serverkeygen: ${(err as Error).message}`, { status: r.status, cause: err });
    }
    return { ...pickLeaf(this.#certs(parsed.certsOnly, 'serverkeygen'), 'serverkeygen'), privateKeyPkcs8: parsed.privateKeyPkcs8 };
  }
}

function exportKey(key: KeyObject): string {
  return key.export({ format: 'pem', type: 'pkcs8' }) as string;
}

/** The end-entity certificate of a certs-only answer (the first that is not a CA). */
function pickLeaf(certificates: Buffer[], what: string): EstIssued {
  if (certificates.length === 0) throw new EstClientError('EST_BAD_RESPONSE', `${what}: the answer holds no certificate`);
  let leaf: Buffer | undefined;
  for (const der of certificates) {
    try {
      if (!new X509Certificate(der).ca) { leaf = der; break; }
    } catch (err) {
      throw new EstClientError('EST_BAD_RESPONSE', `${what}: the answer holds an unreadable certificate`, { cause: err });
    }
  }
  return { certificate: leaf ?? certificates[0]!, certificates };
}
