// Rich text for message content (issue 14), built as DOM nodes: never innerHTML, so no
// content can become markup. The stored content stays plain text; this only decides how
// the page shows it:
//   ```code block```   `inline code`   **bold**   _italic_   http(s) links
// Links are made only for http: and https: URLs (never javascript:, data:, ...), open in a
// new tab with rel="noopener noreferrer". Anything else, HTML included, is shown as text.

const FENCE = /```(?:[a-z0-9_+-]*\n)?([\s\S]*?)```/g;
// One alternative per kind; the first that matches at a position wins.
const INLINE = new RegExp(
  [
    "`([^`\\n]+)`", // 1: code
    "\\*\\*([^*\\n]+?)\\*\\*", // 2: bold
    // 3: italic, opened at a word start (not inside snake_case or window.__x), no space
    // just inside the underscores.
    "(?<![^\\s(])_([^_\\s](?:[^_\\n]*?[^_\\s])?)_(?![A-Za-z0-9_])",
    "(https?:\\/\\/[^\\s<>\"'`]+)", // 4: a link
  ].join("|"),
  "gi",
);
const TRAILING = /[.,;:!?)\]}'"]+$/; // punctuation after a link is not part of it

export function safeHref(text) {
  let url;
  try {
    url = new URL(text);
  } catch {
    return null;
  }
  return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
}

function link(raw) {
  const trailing = raw.match(TRAILING)?.[0] ?? "";
  const target = trailing ? raw.slice(0, -trailing.length) : raw;
  const href = safeHref(target);
  if (!href) return [document.createTextNode(raw)];
  const a = document.createElement("a");
  a.href = href;
  a.textContent = target;
  a.rel = "noopener noreferrer";
  a.target = "_blank";
  return trailing ? [a, document.createTextNode(trailing)] : [a];
}

function inline(text, depth = 0) {
  const out = [];
  let last = 0;
  INLINE.lastIndex = 0;
  for (let m = INLINE.exec(text); m; m = INLINE.exec(text)) {
    if (m.index > last) out.push(document.createTextNode(text.slice(last, m.index)));
    last = m.index + m[0].length;
    if (m[1] !== undefined) {
      const code = document.createElement("code");
      code.textContent = m[1];
      out.push(code);
    } else if (m[2] !== undefined || m[3] !== undefined) {
      const node = document.createElement(m[2] !== undefined ? "strong" : "em");
      const inner = m[2] ?? m[3];
      // One level of nesting (**bold _italic_**) is enough, and bounds the work.
      if (depth < 1) node.append(...inline(inner, depth + 1));
      else node.textContent = inner;
      INLINE.lastIndex = last; // the recursive call shared the regex
      out.push(node);
    } else {
      out.push(...link(m[4]));
    }
  }
  if (last < text.length) out.push(document.createTextNode(text.slice(last)));
  return out;
}

// A DocumentFragment showing `text`.
export function renderRichText(text) {
  const fragment = document.createDocumentFragment();
  let last = 0;
  FENCE.lastIndex = 0;
  for (let m = FENCE.exec(text); m; m = FENCE.exec(text)) {
    if (m.index > last) fragment.append(...inline(text.slice(last, m.index)));
    const pre = document.createElement("pre");
    const code = document.createElement("code");
    code.textContent = m[1];
    pre.append(code);
    fragment.append(pre);
    last = m.index + m[0].length;
  }
  if (last < text.length) fragment.append(...inline(text.slice(last)));
  return fragment;
}
