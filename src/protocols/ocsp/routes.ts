// OCSP over HTTP (RFC 6960 Appendix A, RFC 5019 §5-6), on the plain HTTP listener and on HTTPS:
//
//   POST /ocsp            body: DER OCSPRequest, Content-Type: application/ocsp-request
//   GET  /ocsp/<base64>   the DER OCSPRequest, base64 then URL-encoded (A.1)
//
// Answers are application/ocsp-response with HTTP 200 whatever the OCSP status (malformedRequest,
// unauthorized, internalError are OCSP statuses, as clients expect). Only what is not an OCSP request
// at all gets an HTTP error, as text: a body over the size limit (413), a POST of another
// Content-Type (415).
//
// HTTP caching (RFC 5019 §6.2): a GET without nonce answered from the responder's cache carries
// Cache-Control max-age (until nextUpdate, capped by httpMaxAgeSeconds: the cap bounds how long an
// intermediary may keep serving an answer given before a revocation), ETag, Last-Modified and Expires,
// and If-None-Match is honoured (304). Everything else is Cache-Control: no-store.
//
// Parse and render only: the responder (responder.ts) decides statuses, signs and caches. One responder
// per Authority is shared by the listeners that register these routes; it stops when the last closes.

import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Authority } from '../../authority/authority.js';
import { HallmarkError, toHallmarkError } from '../../errors.js';
import { OCSP_LIMITS, encodeOcspStatusResponse } from './ocsp.js';
import { OcspResponder, type OcspAnswer, type OcspResponderOptions } from './responder.js';

export interface OcspRouteOptions extends OcspResponderOptions {
  /** Cap on Cache-Control max-age for cacheable GET answers. Default 600 s. */
  readonly httpMaxAgeSeconds?: number;
}

const OCSP_REQUEST = 'application/ocsp-request';
const OCSP_RESPONSE = 'application/ocsp-response';
/** A GET path may carry the base64 of a request of the same limit, URL-encoded (each of + / = may take 3 characters). */
const MAX_GET_PATH = Math.ceil((OCSP_LIMITS.requestBytes * 4) / 3) * 3;
const DEFAULT_HTTP_MAX_AGE = 600;
const MALFORMED = encodeOcspStatusResponse('malformedRequest');

const shared = new WeakMap<Authority, { responder: OcspResponder; users: number }>();

/** The OCSP responder of this authority, shared by the listeners (created on first use with these options). */
export function ocspResponderFor(authority: Authority, options: OcspResponderOptions = {}): OcspResponder {
  let s = shared.get(authority);
  if (!s) shared.set(authority, (s = { responder: new OcspResponder(authority, options), users: 0 }));
  return s.responder;
}

export async function registerOcspRoutes(app: FastifyInstance, authority: Authority, options: OcspRouteOptions = {}): Promise<void> {
  const responder = ocspResponderFor(authority, { log: app.log, ...options });
  shared.get(authority)!.users++;
  const maxAgeCap = options.httpMaxAgeSeconds ?? DEFAULT_HTTP_MAX_AGE;

  await app.register(async (scope) => {
    scope.addHook('onClose', async () => {
      const s = shared.get(authority);
      if (s && s.responder === responder && --s.users <= 0) {
        s.responder.close();
        shared.delete(authority);
      }
    });

    // Bodies are read raw and small whatever their declared type; the type is checked in the route so
    // that a wrong one gets a clear 415 rather than a parser error.
    scope.removeAllContentTypeParsers();
    scope.addContentTypeParser('*', { parseAs: 'buffer', bodyLimit: OCSP_LIMITS.requestBytes }, (_request, body, done) => done(null, body));

    scope.setErrorHandler((err: FastifyError | HallmarkError, request, reply) => {
      let e: HallmarkError;
      const fe = err as FastifyError;
      if (err instanceof HallmarkError) e = err;
      else if (fe.code === 'FST_ERR_CTP_BODY_TOO_LARGE') e = new HallmarkError('INPUT_TOO_LARGE', `an OCSP request is at most ${OCSP_LIMITS.requestBytes} bytes`);
      else if (fe.statusCode === 400 && fe.code?.startsWith('FST_')) e = new HallmarkError('BAD_REQUEST', fe.message);
      else e = toHallmarkError(err);
      if (e.status >= 500) request.log.error({ err, code: e.code }, 'OCSP request failed');
      else request.log.info({ code: e.code, reason: e.message }, 'OCSP request refused');
      void reply.status(e.status).header('cache-control', 'no-store').type('text/plain; charset=utf-8').send(`${e.code}: ${e.message}\n`);
    });

    const post = async (request: FastifyRequest, reply: FastifyReply) => {
      const type = (request.headers['content-type'] ?? '').split(';')[0]!.trim().toLowerCase();
      if (type !== OCSP_REQUEST) throw new HallmarkError('UNSUPPORTED_MEDIA_TYPE', `an OCSP request is sent as Content-Type: ${OCSP_REQUEST} (got ${JSON.stringify(type.slice(0, 64) || 'none')})`);
      const body = request.body as Buffer | undefined;
      return send(request, reply, await responder.respond(body ?? Buffer.alloc(0), request.ip), false);
    };
    scope.post('/ocsp', { schema: { hide: true } }, post);
    scope.post('/ocsp/', { schema: { hide: true } }, post);

    scope.get('/ocsp/*', { schema: { hide: true } }, async (request, reply) => {
      const path = request.url.split('?')[0]!;
      const encoded = path.slice(path.indexOf('/ocsp/') + '/ocsp/'.length);
      if (encoded.length > MAX_GET_PATH) throw new HallmarkError('INPUT_TOO_LARGE', `an OCSP request is at most ${OCSP_LIMITS.requestBytes} bytes`);
      const der = decodeGetPath(encoded);
      if (!der) {
        responder.stats.requests++;
        responder.stats.malformed++;
        return send(request, reply, { der: MALFORMED, status: 'malformedRequest', cacheable: false, fromCache: false }, true);
      }
      return send(request, reply, await responder.respond(der, request.ip), true);
    });
  });

  function send(request: FastifyRequest, reply: FastifyReply, answer: OcspAnswer, get: boolean): FastifyReply {
    void reply.status(200).header('content-type', OCSP_RESPONSE);
    if (get && answer.cacheable && answer.nextUpdate && answer.thisUpdate && answer.etag) {
      const maxAge = Math.max(0, Math.min(maxAgeCap, Math.floor((answer.nextUpdate.getTime() - Date.now()) / 1000)));
      void reply
        .header('cache-control', `max-age=${maxAge}, public, no-transform, must-revalidate`)
        .header('etag', answer.etag)
        .header('last-modified', answer.thisUpdate.toUTCString())
        .header('expires', answer.nextUpdate.toUTCString());
      const inm = request.headers['if-none-match'];
      if (typeof inm === 'string' && inm.split(',').some((t) => t.trim() === answer.etag)) return reply.status(304).send();
    } else {
      void reply.header('cache-control', 'no-store');
    }
    return reply.send(answer.der);
  }
}

/** The DER request in a GET path: URL-decoded, then base64 (standard or URL-safe alphabet). Undefined when it is not base64. */
export function decodeGetPath(encoded: string): Buffer | undefined {
  let text: string;
  try {
    text = decodeURIComponent(encoded);
  } catch {
    return undefined;
  }
  text = text.replace(/\s+/g, '');
  if (text.length === 0 || !/^[A-Za-z0-9+/_-]+={0,2}$/.test(text)) return undefined;
  const der = Buffer.from(text, 'base64');
  return der.length > 0 ? der : undefined;
}
