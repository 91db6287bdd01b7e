// A small Markdown renderer for the model's answers: it builds DOM nodes and sets only textContent,
// so nothing the model writes can become HTML or script. Covers what chat answers use: paragraphs,
// headings, fenced code, inline code, bold, italics, bullet and numbered lists, block quotes, and
// links (http and https only).
"use strict";

function renderMarkdown(text, target) {
  target.replaceChildren();
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  let paragraph = [];
  const flush = () => {
    if (paragraph.length) {
      const p = document.createElement("p");
      appendInline(p, paragraph.join("\n"));
      target.appendChild(p);
      paragraph = [];
    }
  };
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)\s*$/);
    if (fence) {
      flush();
      const code = [];
      i++;
      while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i++]);
      i++;  // the closing fence (or the end of a still-streaming answer)
      const pre = document.createElement("pre");
      const el = document.createElement("code");
      if (fence[1]) el.dataset.lang = fence[1];
      el.textContent = code.join("\n");
      pre.appendChild(el);
      target.appendChild(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      flush();
      const h = document.createElement("h" + Math.min(6, heading[1].length + 2));
      appendInline(h, heading[2]);
      target.appendChild(h);
      i++;
      continue;
    }
    const item = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
    if (item) {
      flush();
      const ordered = /\d/.test(item[1]);
      const list = document.createElement(ordered ? "ol" : "ul");
      while (i < lines.length) {
        const m = lines[i].match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
        if (!m || /\d/.test(m[1]) !== ordered) break;
        const li = document.createElement("li");
        appendInline(li, m[2]);
        list.appendChild(li);
        i++;
      }
      target.appendChild(list);
      continue;
    }
    if (/^>\s?/.test(line)) {
      flush();
      const quote = document.createElement("blockquote");
      const quoted = [];
      while (i < lines.length && /^>\s?/.test(lines[i])) quoted.push(lines[i++].replace(/^>\s?/, ""));
      appendInline(quote, quoted.join("\n"));
      target.appendChild(quote);
      continue;
    }
    if (line.trim() === "") flush(); else paragraph.push(line);
    i++;
  }
  flush();
}

// Inline spans: `code`, **bold**, *italic* / _italic_, [text](http...), line breaks.
const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([\s\S]+?)\*\*|\*([^*\s][^*]*?)\*|_([^_\s][^_]*?)_|\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)|\n/g;

function appendInline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
    last = m.index + m[0].length;
    let el;
    if (m[1]) { el = document.createElement("code"); el.textContent = m[2]; }
    else if (m[3] !== undefined) { el = document.createElement("strong"); appendInline(el, m[3]); }
    else if (m[4] !== undefined || m[5] !== undefined) { el = document.createElement("em"); appendInline(el, m[4] ?? m[5]); }
    else if (m[6] !== undefined) {
      el = document.createElement("a");
      el.href = m[7];
      el.rel = "noopener noreferrer";
      el.target = "_blank";
      el.textContent = m[6];
    } else el = document.createElement("br");
    parent.appendChild(el);
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
}
