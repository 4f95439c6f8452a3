// EST (RFC 7030) over the HTTPS listener: parse and render only. Who the device is and whether it gets a
// certificate is decided by the enrolment service and the authority core.
//
//   GET  /.well-known/est[/<label>]/cacerts         certs-only CMS of the CA certificates
//   POST /.well-known/est[/<label>]/simpleenroll    PKCS#10 (base64)  -> certs-only CMS
//   POST /.well-known/est[/<label>]/simplereenroll  same, authenticated by the current certificate
//   POST /.well-known/est[/<label>]/serverkeygen    -> multipart/mixed: PKCS#8 key + certs-only CMS
//   GET  /.well-known/est[/<label>]/csrattrs        what the CSR should contain
//
// Errors are plain text with the status RFC 7030 gives them: 401 + WWW-Authenticate when credentials
// are missing or wrong, 400 / 403 / 404 / 413 / 415 / 429 (+ Retry-After) otherwise.

import type { TLSSocket } from 'node:tls';
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Authority } from '../../authority/authority.js';
import type { EnrolmentOperation } from '../../enrollment/authenticator.js';
import type { EnrolmentService } from '../../enrollment/enrolment.js';
import { HallmarkError, toHallmarkError } from '../../errors.js';
import { csrSpkiOf, parseCsr, verifyCsr, OID_CHALLENGE_PASSWORD } from '../../pki/csr.js';
import { oid } from '../../pki/der.js';
import { SIZE_LIMITS } from '../../pki/pem.js';
import { decodeBase64Body, encodeBase64Body, encodeCertsOnly, encodeCsrAttrs, renderServerKeygenResponse, serverChannelBinding } from './wire.js';

export interface EstOptions {
  /** Requests per minute per client address (0: no limit). */
  readonly perClientPerMinute: number;
}

/** Default per-address request rate on the EST endpoints. */
export const DEFAULT_EST_PER_CLIENT_PER_MINUTE = 6000;

/** A base64 CSR is 4/3 of the DER plus line breaks; anything bigger is refused before it is read. */
const EST_BODY_LIMIT = Math.ceil((SIZE_LIMITS.csr * 4) / 3) + 4096;
const LABEL = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const CERTS_ONLY = 'application/pkcs7-mime; smime-type=certs-only';
const MAX_PEER_CHAIN = 8;

// ecPublicKey with the P-256 curve, signed with ECDSA-SHA256: what Hallmark device profiles expect.
const CSR_ATTRS = encodeCsrAttrs([
  { oid: OID_CHALLENGE_PASSWORD },
  { attribute: '1.2.840.10045.2.1', values: [oid('1.2.840.10045.3.1.7')] },
  { oid: '1.2.840.10045.4.3.2' },
]);

/** The client certificate chain the peer sent, leaf first (DER); parsed once per TLS connection. */
const peerChains = new WeakMap<object, readonly Buffer[]>();
function peerChain(socket: TLSSocket): readonly Buffer[] {
  let chain = peerChains.get(socket);
  if (chain) return chain;
  const out: Buffer[] = [];
  if (typeof socket.getPeerCertificate === 'function') {
    let c = socket.getPeerCertificate(true) as { raw?: Buffer; issuerCertificate?: unknown } | undefined;
    while (c && c.raw && out.length < MAX_PEER_CHAIN) {
      if (out.some((d) => d.equals(c!.raw!))) break; // a self-signed certificate is its own issuer
      out.push(c.raw);
      c = c.issuerCertificate as typeof c;
    }
  }
  chain = out;
  peerChains.set(socket, chain);
  return chain;
}

function sendCms(reply: FastifyReply, der: Buffer, type = CERTS_ONLY): FastifyReply {
  return reply.status(200).header('content-type', type).header('content-transfer-encoding', 'base64').header('cache-control', 'no-store').send(encodeBase64Body(der));
}

export async function registerEstRoutes(app: FastifyInstance, authority: Authority, enrolment: EnrolmentService, options: EstOptions): Promise<void> {
  await app.register(async (est) => {
    // EST bodies are base64 text whatever their declared type; read them raw, small, and check the type in the route.
    est.removeAllContentTypeParsers();
    est.addContentTypeParser('*', { parseAs: 'buffer', bodyLimit: EST_BODY_LIMIT }, (_request, body, done) => done(null, body));

    est.setErrorHandler((err: FastifyError | HallmarkError, request, reply) => {
      let e: HallmarkError;
      const fe = err as FastifyError;
      if (err instanceof HallmarkError) e = err;
      else if (fe.code === 'FST_ERR_CTP_BODY_TOO_LARGE') e = new HallmarkError('INPUT_TOO_LARGE', `request body is over the ${EST_BODY_LIMIT}-byte limit`);
      else if (fe.statusCode === 400 && fe.code?.startsWith('FST_')) e = new HallmarkError('BAD_REQUEST', fe.message);
      else e = toHallmarkError(err);
      if (e.status >= 500) request.log.error({ err, code: e.code }, 'EST request failed');
      else request.log.info({ code: e.code, reason: e.message, url: request.url }, 'EST request refused');
      if (e.status === 401) void reply.header('www-authenticate', 'Basic realm="hallmark-est", charset="UTF-8"');
      const wait = (e as { retryAfterSeconds?: number }).retryAfterSeconds;
      if (wait) void reply.header('retry-after', String(wait));
      void reply.status(e.status).header('cache-control', 'no-store').type('text/plain; charset=utf-8').send(`${e.code}: ${e.message}\n`);
    });

    const checkLabel = async (label: string | undefined): Promise<void> => {
      if (label === undefined) return;
      if (!LABEL.test(label) || !(await enrolment.labelKind(label))) throw new HallmarkError('NOT_FOUND', `no EST label ${JSON.stringify(label.slice(0, 64))} (a product or line name)`);
    };
    const limit = (request: FastifyRequest): void => {
      if (options.perClientPerMinute > 0) enrolment.limiter.check(`client:${request.ip}`, options.perClientPerMinute, 'from this address');
    };

    const cacerts = async (request: FastifyRequest<{ Params: { label?: string } }>, reply: FastifyReply) => {
      limit(request);
      await checkLabel(request.params.label);
      const certificates = await caCertificates(authority, request.params.label);
      return sendCms(reply, encodeCertsOnly(certificates));
    };
    const csrattrs = async (request: FastifyRequest<{ Params: { label?: string } }>, reply: FastifyReply) => {
      limit(request);
      await checkLabel(request.params.label);
      return sendCms(reply, CSR_ATTRS, 'application/csrattrs');
    };
    const enrol = (operation: EnrolmentOperation) => async (request: FastifyRequest<{ Params: { label?: string } }>, reply: FastifyReply) => {
      limit(request);
      const type = (request.headers['content-type'] ?? '').split(';')[0]!.trim().toLowerCase();
      if (type !== 'application/pkcs10') throw new HallmarkError('UNSUPPORTED_MEDIA_TYPE', `the body must be a base64 PKCS#10 CSR sent as Content-Type: application/pkcs10 (got ${JSON.stringify(type.slice(0, 64) || 'none')})`);
      await checkLabel(request.params.label);
      const body = request.body as Buffer | undefined;
      if (!body || body.length === 0) throw new HallmarkError('BAD_REQUEST', 'empty body: send the CSR as base64 DER');
      const csr = parseCsr(decodeBase64Body(body, SIZE_LIMITS.csr));
      const csrKey = await verifyCsr(csr);
      const socket = request.raw.socket as TLSSocket;
      const result = await enrolment.enrol({
        operation,
        label: request.params.label,
        csr,
        csrKey,
        csrSpki: csrSpkiOf(csr, csrKey),
        peerChain: peerChain(socket),
        authorization: request.headers.authorization,
        // Only a CSR with a challengePassword is checked against it (registered-key authenticator):
        // exporting keying material costs every other enrolment ~15 µs for nothing.
        channelBinding: csr.attributes.some((a) => a.oid === OID_CHALLENGE_PASSWORD) ? serverChannelBinding(socket) : undefined,
        source: request.ip,
      });
      request.log.info({ udid: result.udid, serial: result.serial, authenticator: result.authenticator, operation }, 'EST enrolment');
      const certsOnly = encodeCertsOnly([result.der]);
      if (operation !== 'serverkeygen') return sendCms(reply, certsOnly);
      const { contentType, body: multipart } = renderServerKeygenResponse(result.privateKeyPkcs8!, certsOnly);
      return reply.status(200).header('content-type', contentType).header('cache-control', 'no-store').send(multipart);
    };

    for (const prefix of ['/.well-known/est', '/.well-known/est/:label']) {
      const schema = { hide: true };
      est.get(`${prefix}/cacerts`, { schema }, cacerts);
      est.get(`${prefix}/csrattrs`, { schema }, csrattrs);
      est.post(`${prefix}/simpleenroll`, { schema }, enrol('enroll'));
      est.post(`${prefix}/simplereenroll`, { schema }, enrol('reenroll'));
      est.post(`${prefix}/serverkeygen`, { schema }, enrol('serverkeygen'));
    }
  });
}

/**
 * The CA certificates a device needs: for a line label, that line's issuing chain; otherwise every
 * active issuing CA with the root (a product's devices may come from several lines). During a root
 * rollover (more than one active root) the root part is, per RFC 7030 §4.1.3: the current root
 * (NewWithNew), NewWithOld, OldWithNew and the old root (OldWithOld); a line's chain gets them too.
 */
export async function caCertificates(authority: Authority, label: string | undefined): Promise<Buffer[]> {
  const roots = await authority.directory.rootCertificates();
  const withRoots = (certs: Buffer[]): Buffer[] => {
    if (roots.length > 1) for (const r of roots) if (!certs.some((c) => c.equals(r))) certs.push(r);
    return certs;
  };
  if (label !== undefined) {
    const line = await authority.store.db.selectFrom('lines').innerJoin('certificate_authorities as ca', 'ca.id', 'lines.ca_id').select('ca.name').where('lines.name', '=', label).executeTakeFirst();
    if (line) return withRoots(await authority.caChain(line.name, true));
  }
  const cas = await authority.listCas();
  const out: Buffer[] = [];
  for (const ca of cas) {
    if (ca.status !== 'active' || ca.role === 'root') continue;
    const [der] = await authority.caChain(ca.name, false);
    if (der) out.push(der);
  }
  out.push(...roots);
  return out;
}
