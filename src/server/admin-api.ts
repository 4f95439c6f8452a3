// Admin API under /api/v1: bearer tokens with scopes, a schema for every body and response, and
// the OpenAPI document generated from those schemas.

import swagger from '@fastify/swagger';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { listAudit, verifyAuditLog } from '../audit/audit-log.js';
import type { Authority } from '../authority/authority.js';
import { SCOPES, authenticateToken, createToken, listTokens, parseDuration, parseScopes, requireScope, revokeToken, type Principal, type Scope } from '../authority/tokens.js';
import { ERROR_CODES, HallmarkError } from '../errors.js';
import { normaliseSerialHex } from '../pki/certificate.js';
import { encodePem } from '../pki/pem.js';
import { registerRegistryApi } from './registry-api.js';
import { registerEnrolmentApi } from './enrolment-api.js';
import { registerWebhooksApi } from './webhooks-api.js';
import { describeTarget, parseRevocationReason, type RevocationTarget } from '../authority/revocation.js';

declare module 'fastify' {
  interface FastifyRequest { principal?: Principal }
  interface FastifyContextConfig { scope?: Scope }
}

const errorSchema = {
  type: 'object',
  properties: { error: { type: 'object', properties: { code: { type: 'string', enum: Object.keys(ERROR_CODES) }, message: { type: 'string' } }, required: ['code', 'message'] } },
  required: ['error'],
} as const;
const errors = { 400: errorSchema, 401: errorSchema, 403: errorSchema, 404: errorSchema, 409: errorSchema, 413: errorSchema, 500: errorSchema, 503: errorSchema };

const caSchema = {
  type: 'object',
  properties: {
    name: { type: 'string' }, role: { type: 'string' }, status: { type: 'string' }, parent: { type: ['string', 'null'] }, subject: { type: 'string' },
    keyId: { type: 'string' }, keyAlgorithm: { type: 'string' }, keyLocation: { type: 'string' }, serial: { type: ['string', 'null'] },
    notBefore: { type: ['string', 'null'] }, notAfter: { type: ['string', 'null'] }, pathLen: { type: ['integer', 'null'] }, isDefaultIssuer: { type: 'boolean' },
  },
} as const;

const certificateSchema = {
  type: 'object',
  properties: {
    serial: { type: 'string' }, issuer: { type: 'string' }, profile: { type: 'string' }, subject: { type: 'string' }, status: { type: 'string' },
    notBefore: { type: 'string' }, notAfter: { type: 'string' }, fingerprintSha256: { type: 'string' }, certificate: { type: 'string', description: 'PEM' },
    chain: { type: 'string', description: 'PEM, issuing CA first, without the root' },
  },
} as const;

const stringList = { type: 'array', items: { type: 'string', maxLength: 253 }, maxItems: 32 } as const;

const actorOf = (request: FastifyRequest): string => `token:${request.principal?.tokenId ?? '?'}`;

export async function registerAdminApi(app: FastifyInstance, authority: Authority): Promise<void> {
  await app.register(swagger, {
    openapi: {
      openapi: '3.0.3',
      info: { title: 'Hallmark admin API', version: '1', description: 'Device identity authority. Authenticate with `Authorization: Bearer hm_…` (hallmark token create).' },
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
      security: [{ bearer: [] }],
    },
  });

  app.get('/api/v1/openapi.json', { schema: { hide: true } }, async () => app.swagger());

  // Authentication and scope check for every /api/v1 route that declares a scope.
  app.addHook('preHandler', async (request) => {
    const scope = request.routeOptions.config?.scope;
    if (!scope) return;
    const header = request.headers.authorization;
    const token = header?.startsWith('Bearer ') ? header.slice(7).trim() : undefined;
    const principal = await authenticateToken(authority.store, token, `ip:${request.ip}`);
    try {
      requireScope(principal, scope);
    } catch (err) {
      await authority.audit([{ actor: `token:${principal.tokenId}`, action: 'auth.forbidden', target: request.routeOptions.url ?? request.url, details: { scope } }]);
      throw err;
    }
    request.principal = principal;
    // Every token use is audited; state-changing routes record their own entry with this actor.
    if (request.method === 'GET') await authority.audit([{ actor: `token:${principal.tokenId}`, action: 'token.use', target: principal.tokenId, details: { route: `${request.method} ${request.routeOptions.url}` } }]);
  });

  registerRegistryApi(app, authority);
  registerEnrolmentApi(app, authority);
  registerWebhooksApi(app, authority);

  app.get('/api/v1/cas', {
    config: { scope: 'ca:read' },
    schema: { summary: 'List the CA hierarchy', tags: ['ca'], response: { 200: { type: 'object', properties: { items: { type: 'array', items: caSchema } } }, ...errors } },
  }, async () => ({ items: await authority.listCas() }));

  app.get<{ Params: { name: string }; Querystring: { chain?: boolean } }>('/api/v1/cas/:name/certificate', {
    config: { scope: 'ca:read' },
    schema: {
      summary: 'A CA certificate (with ?chain=true, up to the root) as PEM', tags: ['ca'],
      params: { type: 'object', properties: { name: { type: 'string', maxLength: 63 } }, required: ['name'] },
      querystring: { type: 'object', properties: { chain: { type: 'boolean' } } },
      response: { 200: { type: 'object', properties: { pem: { type: 'string' } } }, ...errors },
    },
  }, async (request) => ({ pem: (await authority.caChain(request.params.name, !!request.query.chain)).map((d) => encodePem('CERTIFICATE', d)).join('') }));

  app.post<{ Body: { csr: string; profile?: string; ca?: string; subject?: string; dns?: string[]; ip?: string[]; uri?: string[]; validityDays?: number } }>('/api/v1/certificates', {
    config: { scope: 'certificates:issue' },
    schema: {
      summary: 'Issue a certificate from a PKCS#10 CSR', tags: ['certificates'],
      body: {
        type: 'object', additionalProperties: false, required: ['csr'],
        properties: {
          csr: { type: 'string', maxLength: 131072, description: 'PEM or base64 DER PKCS#10' },
          profile: { type: 'string', maxLength: 64 }, ca: { type: 'string', maxLength: 63 }, subject: { type: 'string', maxLength: 1024 },
          dns: stringList, ip: stringList, uri: stringList, validityDays: { type: 'integer', minimum: 1, maximum: 10950 },
        },
      },
      response: { 201: certificateSchema, ...errors },
    },
  }, async (request, reply) => {
    const b = request.body;
    const cert = await authority.issue({ csr: b.csr, profile: b.profile, ca: b.ca, subject: b.subject, altNames: { dns: b.dns, ip: b.ip, uri: b.uri }, validityDays: b.validityDays, actor: actorOf(request) });
    return reply.status(201).send({
      serial: cert.serial, issuer: cert.issuer, profile: cert.profile, subject: cert.subject, status: 'valid',
      notBefore: cert.notBefore.toISOString(), notAfter: cert.notAfter.toISOString(), fingerprintSha256: cert.fingerprintSha256,
      certificate: encodePem('CERTIFICATE', cert.der), chain: cert.chain.slice(0, -1).map((d) => encodePem('CERTIFICATE', d)).join(''),
    });
  });

  app.get<{ Params: { serial: string } }>('/api/v1/certificates/:serial', {
    config: { scope: 'certificates:read' },
    schema: {
      summary: 'Look up certificates by serial number (hex)', tags: ['certificates'],
      params: { type: 'object', properties: { serial: { type: 'string', maxLength: 64 } }, required: ['serial'] },
      response: { 200: { type: 'object', properties: { items: { type: 'array', items: certificateSchema } } }, ...errors },
    },
  }, async (request) => {
    const rows = await authority.findCertificate(normaliseSerialHex(request.params.serial));
    if (rows.length === 0) throw new HallmarkError('CERTIFICATE_NOT_FOUND', `no certificate with serial ${request.params.serial}`);
    return { items: rows.map(({ der, ...r }) => ({ ...r, certificate: encodePem('CERTIFICATE', der) })) };
  });

  app.post<{ Body: { serial?: string; ca?: string; device?: string; batch?: string; line?: string; reason?: string } }>('/api/v1/revocations', {
    config: { scope: 'certificates:revoke' },
    schema: {
      summary: 'Revoke a certificate (serial, with ca when ambiguous), a device, or every certificate of a batch, a line or a CA', tags: ['certificates'],
      body: {
        type: 'object', additionalProperties: false,
        properties: { serial: { type: 'string', maxLength: 64 }, ca: { type: 'string', maxLength: 64 }, device: { type: 'string', maxLength: 95 }, batch: { type: 'string', maxLength: 64 }, line: { type: 'string', maxLength: 64 }, reason: { type: 'string', maxLength: 32 } },
      },
      response: { 200: { type: 'object', properties: { target: { type: 'string' }, reason: { type: 'string' }, revoked: { type: 'integer' }, at: { type: 'string' }, byIssuer: { type: 'object', additionalProperties: { type: 'array', items: { type: 'string' } } } } }, ...errors },
    },
  }, async (request) => {
    const b = request.body;
    const named = [b.serial, b.device, b.batch, b.line].filter((v) => v !== undefined).length + (b.serial === undefined && b.ca !== undefined ? 1 : 0);
    if (named !== 1) throw new HallmarkError('BAD_REQUEST', 'name exactly one of serial, device, batch, line or ca');
    const target: RevocationTarget = b.serial !== undefined ? { serial: b.serial, ca: b.ca } : b.device !== undefined ? { device: b.device } : b.batch !== undefined ? { batch: b.batch } : b.line !== undefined ? { line: b.line } : { ca: b.ca! };
    const reason = parseRevocationReason(b.reason);
    const result = await authority.revoke(target, reason, `token:${request.principal?.tokenId ?? '?'}`);
    return { target: describeTarget(target), reason, revoked: result.revoked, at: result.at.toISOString(), byIssuer: Object.fromEntries([...result.byIssuer].map(([k, v]) => [k, v.serials])) };
  });

  app.get<{ Querystring: { after?: number; limit?: number; action?: string } }>('/api/v1/audit', {
    config: { scope: 'audit:read' },
    schema: {
      summary: 'Audit entries after a sequence number', tags: ['audit'],
      querystring: { type: 'object', properties: { after: { type: 'integer', minimum: 0 }, limit: { type: 'integer', minimum: 1, maximum: 1000 }, action: { type: 'string', maxLength: 64 } } },
      response: { 200: { type: 'object', properties: { items: { type: 'array', items: { type: 'object', additionalProperties: true } } } }, ...errors },
    },
  }, async (request) => ({ items: await listAudit(authority.store.db, request.query) }));

  app.get('/api/v1/audit/verify', {
    config: { scope: 'audit:read' },
    schema: { summary: 'Verify the audit hash chain', tags: ['audit'], response: { 200: { type: 'object', additionalProperties: true }, ...errors } },
  }, async () => verifyAuditLog(authority.store.db));

  app.get('/api/v1/tokens', {
    config: { scope: 'tokens:write' },
    schema: { summary: 'List API tokens (never their secrets)', tags: ['tokens'], response: { 200: { type: 'object', properties: { items: { type: 'array', items: { type: 'object', additionalProperties: true } } } }, ...errors } },
  }, async () => ({ items: await listTokens(authority.store) }));

  app.post<{ Body: { scopes: string[]; ttl?: string; name?: string } }>('/api/v1/tokens', {
    config: { scope: 'tokens:write' },
    schema: {
      summary: 'Create an API token (the token is in this response only)', tags: ['tokens'],
      body: { type: 'object', additionalProperties: false, required: ['scopes'], properties: { scopes: { type: 'array', items: { type: 'string', enum: Object.keys(SCOPES) }, minItems: 1 }, ttl: { type: 'string', maxLength: 16 }, name: { type: 'string', maxLength: 128 } } },
      response: { 201: { type: 'object', properties: { id: { type: 'string' }, token: { type: 'string' }, scopes: { type: 'array', items: { type: 'string' } }, expiresAt: { type: ['string', 'null'] } } }, ...errors },
    },
  }, async (request, reply) => {
    const scopes = parseScopes(request.body.scopes.join(' '));
    // A token can only hand out scopes it holds itself.
    for (const s of scopes) requireScope(request.principal!, s);
    const created = await createToken(authority.store, { scopes, ttlMs: request.body.ttl ? parseDuration(request.body.ttl) : undefined, name: request.body.name, actor: actorOf(request) });
    return reply.status(201).send(created);
  });

  app.delete<{ Params: { id: string } }>('/api/v1/tokens/:id', {
    config: { scope: 'tokens:write' },
    schema: { summary: 'Revoke an API token', tags: ['tokens'], params: { type: 'object', properties: { id: { type: 'string', pattern: '^[0-9a-f]{16}$' } }, required: ['id'] }, response: { 204: { type: 'null' }, ...errors } },
  }, async (request, reply) => {
    await revokeToken(authority.store, request.params.id, actorOf(request));
    return reply.status(204).send();
  });
}
